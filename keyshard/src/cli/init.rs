//! `keyshard init`: set up a coordinator state directory from a policy.

use std::path::{Component, Path, PathBuf};

use keyshard_core::files::{self, Overwrite};
use keyshard_core::fragment::VerifiedFragment;
use keyshard_core::holder::HolderClass;
use keyshard_core::recovery;
use keyshard_core::sharing::MAX_SECRET_LEN;
use zeroize::Zeroizing;

use super::{CliError, load, policy};
use keyshard_coordinator::init::{check_placeable, init};
use keyshard_coordinator::state::{StateDir, StateError, check_vm_id};
use keyshard_tpm::{Tpm, resolve_tcti};

/// A new random key has this many bytes.
const GENERATED_SECRET_LEN: usize = 32;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The sharing policy (TOML): shares per holder class, k, and the PCRs for tpm/sev shares.
    #[arg(long, value_name = "FILE")]
    pub policy: PathBuf,
    /// The coordinator state directory to create.
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// The secret to share (raw bytes; `-` reads stdin). A new random 32-byte key when omitted.
    #[arg(long, value_name = "FILE|-")]
    pub secret_file: Option<PathBuf>,
    /// The dealer's private key. When omitted, a new one is made in DIR/dealer.pem.
    #[arg(long, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
    /// The TPM: a TCTI string (e.g. device:/dev/tpmrm0, swtpm:host=127.0.0.1,port=2321).
    /// Default: $TPM2TOOLS_TCTI, else $TCTI, else device:/dev/tpmrm0.
    #[arg(long, value_name = "TCTI")]
    pub tcti: Option<String>,
    /// Replace an existing state directory's files.
    #[arg(long)]
    pub force: bool,
    /// Write the recovery share (policy `[holders] recovery = 1`) to FILE (0600; never over an
    /// existing file; not inside the state directory). Without it, it is printed once as a
    /// recovery code.
    #[arg(long, value_name = "FILE")]
    pub recovery_file: Option<PathBuf>,
    /// A VM whose broker may be given the attested shares; repeat for each. Default: the state
    /// directory's name, which must then be a valid VM id.
    #[arg(long = "vm-id", value_name = "ID")]
    pub vm_ids: Vec<String>,
}

#[derive(Debug)]
pub struct Config {
    pub policy: PathBuf,
    pub state_dir: StateDir,
    pub secret_file: Option<PathBuf>,
    pub signing_key: Option<PathBuf>,
    pub tcti: String,
    pub overwrite: Overwrite,
    pub recovery_file: Option<PathBuf>,
    pub vm_ids: Vec<String>,
}

impl TryFrom<Args> for Config {
    type Error = CliError;

    fn try_from(args: Args) -> Result<Self, CliError> {
        let vm_ids = vm_ids(&args)?;
        Ok(Self {
            vm_ids,
            policy: args.policy,
            state_dir: StateDir::new(args.state_dir),
            secret_file: args.secret_file,
            signing_key: args.signing_key,
            tcti: resolve_tcti(args.tcti.as_deref()),
            overwrite: if args.force {
                Overwrite::Replace
            } else {
                Overwrite::Refuse
            },
            recovery_file: args.recovery_file,
        })
    }
}

/// The `--vm-id`s, each valid and given once, or the state directory's name.
fn vm_ids(args: &Args) -> Result<Vec<String>, CliError> {
    let invalid = |e: StateError| CliError::InvalidArgument(format!("--vm-id: {e}"));
    if args.vm_ids.is_empty() {
        let name = args
            .state_dir
            .canonicalize()
            .unwrap_or_else(|_| args.state_dir.clone())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        check_vm_id(&name).map_err(|e| {
            CliError::InvalidArgument(format!(
                "no --vm-id given and the state directory's name is not a valid VM id ({e}): give --vm-id"
            ))
        })?;
        return Ok(vec![name]);
    }
    let mut ids: Vec<String> = Vec::new();
    for id in &args.vm_ids {
        check_vm_id(id).map_err(invalid)?;
        if ids.contains(id) {
            return Err(CliError::InvalidArgument(format!(
                "--vm-id {id}: given twice"
            )));
        }
        ids.push(id.clone());
    }
    Ok(ids)
}

pub fn run(config: Config) -> Result<(), CliError> {
    let policy = policy::load(&config.policy)?;
    check_placeable(&policy)?;
    if config.overwrite == Overwrite::Refuse && config.state_dir.state_file().exists() {
        return Err(keyshard_coordinator::init::InitError::Exists(
            config.state_dir.root().to_owned(),
        )
        .into());
    }
    if let Some(path) = &config.recovery_file {
        check_recovery_file(path, &config.state_dir, policy.holders.recovery)?;
    }
    let secret = match &config.secret_file {
        Some(path) => files::read_limited(path, MAX_SECRET_LEN)?,
        None => {
            let mut secret = Zeroizing::new(vec![0u8; GENERATED_SECRET_LEN]);
            getrandom::fill(&mut secret).map_err(|e| CliError::Random(e.to_string()))?;
            secret
        }
    };
    let dealer = match &config.signing_key {
        Some(path) => load::signing_key(path)?,
        None => new_dealer_key(&config)?,
    };
    let needs_tpm =
        policy.holders.get(HolderClass::Tpm) > 0 || policy.holders.get(HolderClass::Sev) > 0;
    let mut tpm = if needs_tpm {
        let tpm = Tpm::open(&config.tcti)?;
        if tpm.info().software {
            log::warn!(
                "{} is a software TPM ({}): fine for tests, not for keeping secrets",
                config.tcti,
                tpm.info()
            );
        } else {
            log::info!("TPM {}: {}", config.tcti, tpm.info());
        }
        Some(tpm)
    } else {
        None
    };
    let report = init(
        &config.state_dir,
        &policy,
        &secret,
        &dealer,
        tpm.as_mut(),
        config.overwrite,
        &config.vm_ids,
    )?;
    let dir = config.state_dir.root().display();
    println!(
        "initialised {dir}: key {} ({} of {} shares rebuild it)",
        report.key_id,
        policy.threshold,
        policy.shares()
    );
    println!(
        "  {} vhd fragment(s) in {dir}/fragments: serve each with vhost-keyshard",
        report.vhd
    );
    if let Some(selection) = &report.selection {
        println!(
            "  {} share(s) sealed to the TPM under PCRs {selection}",
            report.sealed
        );
    }
    if report.removed > 0 {
        println!(
            "  removed {} share file(s) of the replaced key's holders that this policy does not have",
            report.removed
        );
    }
    println!("  guest manifest: {dir}/manifest.toml");
    println!(
        "  attested shares bound to VM id(s): {}",
        config.vm_ids.join(", ")
    );
    if let Some(recovery) = &report.recovery {
        hand_over_recovery(recovery, config.recovery_file.as_deref())?;
    }
    if policy.holders.get(HolderClass::Sev) > 0 {
        println!(
            "  sev shares need {dir}/snp/policy.toml (SEV-SNP policy) before the coordinator releases them"
        );
    }
    Ok(())
}

fn new_dealer_key(config: &Config) -> Result<keyshard_core::keys::DealerSigningKey, CliError> {
    let key = keyshard_core::keys::generate().map_err(|e| CliError::Random(e.to_string()))?;
    let private = config.state_dir.root().join("dealer.pem");
    let public = config.state_dir.root().join("dealer.pem.pub");
    let key_error = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| CliError::Key { path, source }
    };
    files::create_private_dir(config.state_dir.root())?;
    let pem = keyshard_core::keys::signing_key_to_pem(&key).map_err(key_error(&private))?;
    files::write_private(&private, pem.as_bytes(), config.overwrite)?;
    let pem = keyshard_core::keys::verifying_key_to_pem(&key.verifying_key())
        .map_err(key_error(&public))?;
    files::write_atomic(&public, pem.as_bytes(), 0o644, config.overwrite)?;
    Ok(key)
}

/// Refuses a recovery file that would not be kept apart: no recovery share in the policy, an
/// existing file, or a path inside the state directory (whoever copies the directory would copy
/// the recovery share with it).
fn check_recovery_file(path: &Path, state_dir: &StateDir, shares: u8) -> Result<(), CliError> {
    if shares == 0 {
        return Err(CliError::InvalidArgument(
            "--recovery-file: the policy gives no recovery share ([holders] recovery = 1)".into(),
        ));
    }
    files::check_writable(path, Overwrite::Refuse)?;
    if resolve(path)?.starts_with(resolve(state_dir.root())?) {
        return Err(CliError::InvalidArgument(format!(
            "--recovery-file {}: inside the state directory; keep the recovery share apart from it",
            path.display()
        )));
    }
    // The share is written after the state: a directory that is missing or not writable must
    // fail now, not leave a state whose recovery share exists nowhere.
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    tempfile::NamedTempFile::new_in(parent).map_err(|source| {
        CliError::InvalidArgument(format!(
            "--recovery-file {}: cannot write in {}: {source}",
            path.display(),
            parent.display()
        ))
    })?;
    Ok(())
}

/// `path` made absolute with symbolic links resolved, as far as it exists.
fn resolve(path: &Path) -> Result<PathBuf, CliError> {
    let absolute = std::path::absolute(path).map_err(|source| files::FileError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut resolved = real;
            for part in rest.iter().rev() {
                match part {
                    Component::ParentDir => {
                        resolved.pop();
                    }
                    Component::Normal(name) => resolved.push(name),
                    _ => {}
                }
            }
            return Ok(resolved);
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                existing = parent;
            }
            _ => return Ok(absolute.clone()),
        }
    }
}

/// Writes the recovery share to `file`, or prints it once as a recovery code.
fn hand_over_recovery(recovery: &VerifiedFragment, file: Option<&Path>) -> Result<(), CliError> {
    match file {
        Some(path) => {
            files::write_private(path, recovery.encoded(), Overwrite::Refuse)?;
            println!(
                "  recovery share: {} (0600): keep it offline, apart from this host; \
                 `keyshard reseal --recovery-file` needs it after a firmware update",
                path.display()
            );
        }
        None => {
            let code = recovery::encode(recovery)
                .map_err(|e| CliError::InvalidArgument(format!("recovery code: {e}")))?;
            log::warn!(
                "the recovery code below is shown once and stored nowhere: write it down and keep \
                 it offline; `keyshard reseal --recovery-code` reads it after a firmware update"
            );
            if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                // A log file or a pipe on this host keeps the code where root can read it.
                log::warn!(
                    "stdout is not a terminal: the recovery code goes to a file or pipe, which may \
                     keep it on this host; remove it from there, or use --recovery-file on media \
                     kept offline"
                );
            }
            println!("  recovery code:");
            let groups: Vec<&str> = code.split('-').collect();
            for line in groups.chunks(8) {
                let text = Zeroizing::new(line.join("-"));
                println!("    {}", text.as_str());
            }
        }
    }
    Ok(())
}
