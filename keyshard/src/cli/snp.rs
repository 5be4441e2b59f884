//! `keyshard snp verify`: an offline verdict on SEV-SNP evidence (a report and its VCEK) against
//! AMD's built-in roots and, with `--policy`, the coordinator's policy.

use std::path::{Path, PathBuf};

use keyshard_core::files;

use super::CliError;
use keyshard_attest::snp::report::{REPORT_DATA_LEN, REPORT_LEN};
use keyshard_attest::snp::vcek::MAX_VCEK_LEN;
use keyshard_attest::snp::verify::{self, Evidence};
use keyshard_attest::snp::{Report, SnpPolicy, SnpVerifier};

/// A hex report with generous whitespace is well under this.
const MAX_REPORT_FILE_LEN: usize = 4 * REPORT_LEN;
const MAX_POLICY_LEN: usize = 64 * 1024;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Check a report and its VCEK against AMD's roots (and a policy); exit 0 if they verify.
    Verify(VerifyArgs),
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The attestation report: 1184 raw bytes, or the same as hex text.
    #[arg(long, value_name = "FILE")]
    pub report: PathBuf,
    /// The VCEK certificate of the chip that signed it (DER).
    #[arg(long, value_name = "FILE")]
    pub vcek: PathBuf,
    /// SEV-SNP policy (TOML). Without it, only the chain, the VCEK's extensions and the report
    /// signature are checked, and the output names every policy check not made.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// The REPORT_DATA the report must carry: 64 bytes as 128 hex digits.
    #[arg(long, value_name = "HEX")]
    pub report_data: Option<String>,
}

#[derive(Debug)]
pub enum Config {
    Verify(VerifyConfig),
}

#[derive(Debug)]
pub struct VerifyConfig {
    pub report: PathBuf,
    pub vcek: PathBuf,
    pub policy: Option<PathBuf>,
    pub report_data: Option<[u8; REPORT_DATA_LEN]>,
}

impl TryFrom<Args> for Config {
    type Error = CliError;

    fn try_from(args: Args) -> Result<Self, CliError> {
        match args.command {
            Command::Verify(args) => Ok(Self::Verify(VerifyConfig {
                report_data: args.report_data.as_deref().map(report_data).transpose()?,
                report: args.report,
                vcek: args.vcek,
                policy: args.policy,
            })),
        }
    }
}

fn report_data(text: &str) -> Result<[u8; REPORT_DATA_LEN], CliError> {
    let invalid = |why: String| {
        CliError::InvalidArgument(format!(
            "--report-data: {why}; expected {} hex digits",
            2 * REPORT_DATA_LEN
        ))
    };
    let bytes = hex::decode(text.trim()).map_err(|e| invalid(e.to_string()))?;
    let len = bytes.len();
    bytes
        .try_into()
        .map_err(|_| invalid(format!("{len} bytes")))
}

pub fn run(config: Config) -> Result<(), CliError> {
    match config {
        Config::Verify(config) => verify(&config),
    }
}

fn invalid_file(path: &Path, why: impl std::fmt::Display) -> CliError {
    CliError::InvalidArgument(format!("{}: {why}", path.display()))
}

fn load_policy(path: &Path) -> Result<SnpPolicy, CliError> {
    let text = files::read_text(path, MAX_POLICY_LEN)?;
    SnpPolicy::parse(&text).map_err(|e| invalid_file(path, e))
}

fn verify(config: &VerifyConfig) -> Result<(), CliError> {
    let report_bytes = files::read_limited(&config.report, MAX_REPORT_FILE_LEN)?;
    let report =
        Report::from_file_contents(&report_bytes).map_err(|e| invalid_file(&config.report, e))?;
    let vcek = files::read_limited(&config.vcek, MAX_VCEK_LEN)?;
    let policy = config.policy.as_deref().map(load_policy).transpose()?;
    let verifier =
        SnpVerifier::with_amd_roots().map_err(|e| CliError::InvalidArgument(e.to_string()))?;

    let evidence = verifier.verify_evidence(&report, &vcek)?;
    let policy_line = match (&policy, &config.policy) {
        (Some(policy), Some(path)) => {
            verify::check_policy(&evidence, policy)?;
            format!(
                "policy {}: ok: {}",
                path.display(),
                verify::POLICY_CHECKS.join(", ")
            )
        }
        _ => format!(
            "no --policy: only the chain, the VCEK's extensions and the report signature were \
             checked; not checked: {}",
            verify::POLICY_CHECKS.join(", ")
        ),
    };
    let report_data_line = match &config.report_data {
        Some(expected) => {
            verify::check_report_data(&evidence, expected)?;
            "REPORT_DATA: matches --report-data".to_owned()
        }
        None => "REPORT_DATA: not checked (no --report-data)".to_owned(),
    };
    print_verified(&config.report, &evidence);
    println!("{policy_line}");
    println!("{report_data_line}");
    Ok(())
}

fn print_verified(path: &Path, evidence: &Evidence<'_>) {
    let info = &evidence.vcek.info;
    let report = evidence.report;
    println!(
        "{}: verified: VCEK ({}) chains to AMD's {} ARK and ASK, its extensions are complete, and \
         it signed the report",
        path.display(),
        info.product_name,
        info.product
    );
    let on_off = |on: bool| if on { "on" } else { "off" };
    let policy = report.policy();
    let (abi_major, abi_minor) = policy.abi_minimum();
    let platform = report.platform_info();
    println!(
        "report version {}, VMPL {}, guest policy {} (debug {}, SMT {}, single socket {}, ABI \
         minimum {abi_major}.{abi_minor}), platform info {} (SMT {}, TSME {}), VCEK TCB {}",
        report.version(),
        report.vmpl(),
        policy,
        on_off(policy.debug()),
        if policy.smt_allowed() {
            "allowed"
        } else {
            "refused"
        },
        on_off(policy.single_socket()),
        platform,
        on_off(platform.smt_enabled()),
        on_off(platform.tsme_enabled()),
        info.tcb
    );
    println!("measurement {}", hex::encode(report.measurement()));
    println!("report_data {}", hex::encode(report.report_data()));
}
