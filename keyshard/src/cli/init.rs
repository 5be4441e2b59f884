//! `keyshard init`: set up a coordinator state directory from a policy.

use std::path::{Component, Path, PathBuf};

use keyshard_core::files::{self, Overwrite};
use keyshard_core::fragment::VerifiedFragment;
use keyshard_core::holder::HolderClass;
use keyshard_core::recovery;
use keyshard_core::sharing::MAX_SECRET_LEN;
use zeroize::Zeroizing;

use super::credential::{
    CmsArgs, CmsConfig, CredentialCliError, https_client, parse, read_answer, read_hex_key,
    read_instance_policy, runtime,
};
use super::{CliError, load, policy};
use keyshard_cms::server::credentials::{InstanceEntry, PutCredentialResponse};
use keyshard_cms::server::volumes::{FragmentHex, PutVolumeSharesRequest};
use keyshard_coordinator::init::{HostPlacement, check_placeable, init_placing};
use keyshard_coordinator::state::{CmsLink, StateDir, StateError, check_vm_id};
use keyshard_core::host_class::HostEvidence;
use keyshard_core::policy::Policy;
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
    /// The CMS that places the policy's `host` shares on shard hosts (https://HOST:PORT);
    /// needs --ca, --client-pub and --instance-policy.
    #[arg(long, value_name = "URL")]
    pub cms: Option<String>,
    /// The CA certificate(s) (PEM) that signed the CMS's TLS certificate.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Seconds the CMS request may take, connecting included.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub cms_timeout: u64,
    /// The client public key (of `keyshard credential keygen`) the host shares' map is sealed
    /// to: `keyshard credential map --name KEY-ID` opens it with the private key.
    #[arg(long, value_name = "FILE")]
    pub client_pub: Option<PathBuf>,
    /// The VM as an instance that may fetch its host shares (`{"instances": [{"id", "ak_name"}]}`,
    /// the AK name `keyshard instance enroll` printed for the VM's TPM).
    #[arg(long, value_name = "FILE")]
    pub instance_policy: Option<PathBuf>,
    /// Place the host shares even when one region or operator would hold them all.
    #[arg(long)]
    pub allow_correlated: bool,
}

/// Where `host` shares go: the CMS, whom their map is sealed to, which instances may fetch them.
#[derive(Debug)]
pub struct HostShareConfig {
    pub cms: CmsConfig,
    pub client_pub: PathBuf,
    pub instance_policy: PathBuf,
    pub allow_correlated: bool,
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
    pub host_shares: Option<HostShareConfig>,
}

impl TryFrom<Args> for Config {
    type Error = CliError;

    fn try_from(args: Args) -> Result<Self, CliError> {
        let vm_ids = vm_ids(&args)?;
        let host_shares = host_share_config(&args)?;
        Ok(Self {
            vm_ids,
            host_shares,
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

/// `--cms` with the options it needs, or none of them.
fn host_share_config(args: &Args) -> Result<Option<HostShareConfig>, CliError> {
    let Some(cms) = &args.cms else {
        let stray = [
            ("--ca", args.ca.is_some()),
            ("--client-pub", args.client_pub.is_some()),
            ("--instance-policy", args.instance_policy.is_some()),
            ("--allow-correlated", args.allow_correlated),
        ];
        return match stray.iter().find(|(_, given)| *given) {
            Some((flag, _)) => Err(CliError::InvalidArgument(format!(
                "{flag}: only with --cms (placing host shares)"
            ))),
            None => Ok(None),
        };
    };
    let needed = |flag: &str, value: &Option<PathBuf>| {
        value
            .clone()
            .ok_or_else(|| CliError::InvalidArgument(format!("--cms: needs {flag} too")))
    };
    Ok(Some(HostShareConfig {
        cms: CmsArgs {
            cms: cms.clone(),
            ca: needed("--ca", &args.ca)?,
            timeout: args.cms_timeout,
        }
        .try_into()?,
        client_pub: needed("--client-pub", &args.client_pub)?,
        instance_policy: needed("--instance-policy", &args.instance_policy)?,
        allow_correlated: args.allow_correlated,
    }))
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
    let host_shares = host_share_request(&policy, config.host_shares.as_ref())?;
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
    let dealer_public = hex::encode(dealer.verifying_key().as_bytes());
    let mut place = |fragments: &[&VerifiedFragment]| -> Result<HostPlacement, String> {
        match (&host_shares, &config.host_shares) {
            (Some(request), Some(host_config)) => {
                let hosts = place_host_shares(host_config, request, &dealer_public, fragments)
                    .map_err(|e| e.to_string())?;
                host_placement(host_config, request, &config.vm_ids, hosts)
                    .map_err(|e| e.to_string())
            }
            _ => Err("no CMS to place them".to_owned()),
        }
    };
    let report = init_placing(
        &config.state_dir,
        &policy,
        &secret,
        &dealer,
        tpm.as_mut(),
        config.overwrite,
        &config.vm_ids,
        &mut place,
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
    if !report.host_placed.is_empty() {
        println!(
            "  {} host share(s) placed on shard hosts {} (fetched as credential {})",
            report.host_placed.len(),
            report.host_placed.join(", "),
            report.key_id
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

/// What the CMS is sent besides the fragments, read and checked before anything is written:
/// the map's client key and the instances that may fetch the host shares. None when the policy
/// gives no `host` shares. Refused: `host` shares without `--cms`, `--cms` without `host`
/// shares, and `host` shares released to SEV-SNP evidence, which shard hosts do not verify yet.
fn host_share_request(
    policy: &Policy,
    config: Option<&HostShareConfig>,
) -> Result<Option<VolumeTemplate>, CliError> {
    let count = policy.holders.get(HolderClass::Host);
    let config = match (count, config) {
        (0, None) => return Ok(None),
        (0, Some(_)) => {
            return Err(CliError::InvalidArgument(
                "--cms: the policy gives no host shares to place".into(),
            ));
        }
        (_, None) => check_placeable(policy).map(|()| None)?,
        (_, Some(config)) => Some(config),
    };
    let Some(config) = config else {
        return Ok(None);
    };
    if policy.host_evidence() != Some(HostEvidence::VmTpm) {
        return Err(CliError::InvalidArgument(format!(
            "the policy's host shares are released to {} evidence, which shard hosts do not \
             verify yet: only evidence = \"vm-tpm\" (a quote from the VM's TPM) can be placed",
            policy.host_evidence().map_or("no", HostEvidence::as_str)
        )));
    }
    let instances = read_instance_policy(&config.instance_policy)?;
    let client = hex::encode(read_hex_key(&config.client_pub)?.as_slice());
    Ok(Some(VolumeTemplate { client, instances }))
}

/// What the coordinator's relay needs (recorded in the state): the CMS, its CA, and the VM's
/// instance id: the instance policy's entry named like one of the `--vm-id`s, else its first.
fn host_placement(
    config: &HostShareConfig,
    template: &VolumeTemplate,
    vm_ids: &[String],
    hosts: Vec<String>,
) -> Result<HostPlacement, CliError> {
    let instance = template
        .instances
        .iter()
        .find(|i| vm_ids.contains(&i.id))
        .or_else(|| template.instances.first())
        .ok_or_else(|| CliError::InvalidArgument("--instance-policy: no instance".into()))?;
    Ok(HostPlacement {
        hosts,
        cms: CmsLink {
            url: config.cms.base.clone(),
            instance_id: instance.id.clone(),
        },
        ca_pem: files::read_limited(&config.cms.ca, 1024 * 1024)?.to_vec(),
    })
}

/// The parts of a [`PutVolumeSharesRequest`] known before the deal.
#[derive(Debug)]
struct VolumeTemplate {
    client: String,
    instances: Vec<InstanceEntry>,
}

/// `POST /v1/volumes/{key id}/host-shares`: the CMS checks, places and seals the fragments;
/// the hosts they went to, in share order.
fn place_host_shares(
    config: &HostShareConfig,
    template: &VolumeTemplate,
    dealer: &str,
    fragments: &[&VerifiedFragment],
) -> Result<Vec<String>, CliError> {
    let key_id = fragments
        .first()
        .map(|f| f.header().key_id.clone())
        .ok_or_else(|| CliError::InvalidArgument("no host fragment to place".into()))?;
    let request = PutVolumeSharesRequest {
        fragments: fragments
            .iter()
            .map(|f| FragmentHex(Zeroizing::new(f.encoded().to_vec())))
            .collect(),
        dealer: dealer.to_owned(),
        client: template.client.clone(),
        seed: None,
        allow_correlated: config.allow_correlated,
        instances: template.instances.clone(),
    };
    // The body holds the fragments' hex: one Zeroizing buffer, owned by the HTTP client and
    // wiped when it drops it.
    let mut body = Zeroizing::new(Vec::with_capacity(4096));
    serde_json::to_writer(&mut *body, &request)
        .map_err(|e| CredentialCliError::Client(e.to_string()))?;
    drop(request);
    let body = bytes::Bytes::from_owner(body);
    let path = format!("/v1/volumes/{key_id}/host-shares");
    let answer = runtime()?.block_on(async {
        let client = https_client(&config.cms)?;
        let url = format!("{}{path}", config.cms.base);
        let sent = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        read_answer(sent, &url, config.cms.timeout).await
    })?;
    let summary: PutCredentialResponse = parse(&answer, "host shares answer")?;
    Ok(summary.hosts)
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
