//! `keyshard reseal`: re-seal a state directory's tpm and sev shares to the host's current PCR
//! values, with the recovery share (after a firmware or boot-chain update).

use std::path::{Path, PathBuf};

use keyshard_core::files;
use keyshard_core::fragment::MAX_FRAGMENT_LEN;

use super::{CliError, load};
use keyshard_coordinator::reseal::{RecoveryInput, reseal};
use keyshard_coordinator::state::StateDir;
use keyshard_tpm::{Tpm, resolve_tcti};

/// A recovery code is a few hundred characters; allow for line breaks and spaces.
const MAX_RECOVERY_CODE_LEN: usize = 16 * 1024;

#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("recovery").required(true).args(["recovery_file", "recovery_code"])
))]
pub struct Args {
    /// The coordinator state directory `keyshard init` made.
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// The dealer's private key. Default: DIR/dealer.pem (made by `init` without --signing-key).
    #[arg(long, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
    /// The recovery share file written by `init --recovery-file`.
    #[arg(long, value_name = "FILE")]
    pub recovery_file: Option<PathBuf>,
    /// Read the recovery code `init` printed from stdin.
    #[arg(long)]
    pub recovery_code: bool,
    /// The TPM: a TCTI string. Default: $TPM2TOOLS_TCTI, else $TCTI, else device:/dev/tpmrm0.
    #[arg(long, value_name = "TCTI")]
    pub tcti: Option<String>,
}

#[derive(Debug)]
pub struct Config {
    pub state_dir: StateDir,
    pub signing_key: PathBuf,
    pub recovery_file: Option<PathBuf>,
    pub tcti: String,
}

impl TryFrom<Args> for Config {
    type Error = CliError;

    fn try_from(args: Args) -> Result<Self, CliError> {
        let signing_key = args
            .signing_key
            .unwrap_or_else(|| args.state_dir.join("dealer.pem"));
        Ok(Self {
            state_dir: StateDir::new(args.state_dir),
            signing_key,
            recovery_file: args.recovery_file,
            tcti: resolve_tcti(args.tcti.as_deref()),
        })
    }
}

pub fn run(config: Config) -> Result<(), CliError> {
    let dealer = load::signing_key(&config.signing_key)?;
    let recovery = match &config.recovery_file {
        Some(path) => RecoveryInput::File(files::read_limited(path, MAX_FRAGMENT_LEN + 1)?),
        None => RecoveryInput::Code(files::read_text(Path::new("-"), MAX_RECOVERY_CODE_LEN)?),
    };
    let mut tpm = Tpm::open(&config.tcti)?;
    if tpm.info().software {
        log::warn!(
            "{} is a software TPM ({}): fine for tests, not for keeping secrets",
            config.tcti,
            tpm.info()
        );
    }
    let report = reseal(&config.state_dir, &recovery, &dealer, &mut tpm)?;
    let changed = if report.changed.is_empty() {
        "none".to_owned()
    } else {
        let list: Vec<String> = report.changed.iter().map(u8::to_string).collect();
        list.join(", ")
    };
    println!(
        "resealed {} to the current PCRs {} (PCRs changed since they were last sealed: {changed})",
        report.resealed.join(", "),
        report.selection
    );
    println!(
        "  a `keyshard coordinator --state-root` serving {} loads the new sealed keys by itself; restart one started with --state-dir",
        config.state_dir.root().display()
    );
    Ok(())
}
