//! `keyshard shard-host`: a shard host process. It keeps a TPM-resident decrypt key in its
//! state directory, registers with the CMS (its AK enrolled first when the CMS asks for it),
//! serves nonces and releases over HTTPS (`keyshard_cms::shard_host::server`) and registers
//! again every [`REREGISTER_EVERY`], until SIGTERM or SIGINT.
//!
//! Start, in order:
//! 1. the state directory: created 0700 when absent; refused when another user may write it
//!    (owned by another user than root or this one, or group/other-writable), because whoever
//!    replaces `decrypt-key` there chooses which key this host's shards are sealed to;
//! 2. the TPM (`--tcti`); the decrypt key loaded from `DIR/decrypt-key`, or created in the TPM
//!    and written there (atomically, 0600, never replaced): a second start reuses it, so the
//!    shards already sealed to this host stay openable. The file is the TPM's wrapped blob
//!    and public area: useless without this TPM;
//! 3. registration: a challenge from the CMS, TPM2_Certify of the decrypt key by the AK over
//!    it, the PCRs of `--pcrs` as golden values, `PUT /v1/hosts/{id}`. When the CMS answers
//!    `not_enrolled` (its AK is not pinned to this id yet), the host enrols first
//!    (`super::enrol`: its EK certificate, TPM2_ActivateCredential) and registers again; a
//!    CMS that already pins this AK skips that;
//! 4. serving; stdout gets exactly one `ready: shard host ID serving on https://ADDR` line,
//!    then one line per release or refusal.
//!
//! Stdout carries no secret: a release line names the credential, epoch, index and instance.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keyshard_attest::tpm::PcrSelection;
use keyshard_cms::enrolment::EnrolmentKind;
use keyshard_cms::registry::HostRegistration;
use keyshard_cms::server::hosts::{HostRegistered, HostRegistrationRequest};
use keyshard_cms::server::{self, Limits, NonceResponse};
use keyshard_cms::shard_host::ShardHost;
use keyshard_cms::shard_host::nonces::MemoryNonceBook;
use keyshard_cms::shard_host::server::{HostState, ReleaseEvent, ShardHostServer};
use keyshard_cms::shard_host::tpm_key::TpmDecryptKey;
use keyshard_cms::store::Nonce;
use keyshard_core::files::{self, Overwrite};
use keyshard_shards::map::Endpoint;
use keyshard_shards::{DomainName, FailureDomain, HostId};
use keyshard_tpm::{DecryptKey, TpmConfig, TpmService};
use vhost_keyshard::daemon;

use super::cms_client::CmsClient;
use super::credential::{CmsArgs, CmsConfig, CredentialCliError};
use super::enrol::{AkName, enrol};
use super::{CliError, load};

/// How often the host registers again (the CMS counts a registration fresh for an hour).
pub const REREGISTER_EVERY: Duration = Duration::from_secs(20 * 60);
/// The golden PCRs registered when `--pcrs` is not given.
pub const DEFAULT_PCRS: &str = "sha256:0,7";
/// The decrypt key's file in the state directory.
pub const DECRYPT_KEY_FILE: &str = "decrypt-key";
/// A decrypt key file is a TPM blob of a few hundred bytes.
const MAX_DECRYPT_KEY_FILE_LEN: usize = 16 * 1024;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub cms: CmsArgs,
    /// The CMS's verifying key (FILE.pub of `keyshard keygen`, PEM): grants must verify under it.
    #[arg(long, value_name = "FILE")]
    pub cms_key: PathBuf,
    /// Address and port to serve HTTPS on (port 0: any free port, printed on the ready line).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// This host's id (`a-z 0-9 . _ -`, 1..=64).
    #[arg(long, value_name = "ID")]
    pub host_id: String,
    /// The failure domain: region=R,operator=O.
    #[arg(long, value_name = "region=R,operator=O")]
    pub domain: String,
    /// The TPM: a TCTI string, e.g. swtpm:host=127.0.0.1,port=2321 or device:/dev/tpmrm0.
    #[arg(long, value_name = "TCTI")]
    pub tcti: String,
    /// Where the decrypt key lives (created 0700 when absent).
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// The server's certificate chain, PEM, leaf first.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: PathBuf,
    /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE")]
    pub tls_key: PathBuf,
    /// The URL instances reach this host at, as the shard map names it (default:
    /// https://ADDR of the bound address).
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// Placement weight, 1..=2^32-1.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub weight: u32,
    /// The PCRs registered as this host's golden values, e.g. sha256:0,7.
    #[arg(long, value_name = "SEL", default_value = DEFAULT_PCRS)]
    pub pcrs: String,
    /// Write the process id here once the host serves.
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
}

/// A validated `shard-host`.
#[derive(Debug)]
pub struct Config {
    pub cms: CmsConfig,
    pub cms_key: PathBuf,
    pub listen: SocketAddr,
    pub host_id: HostId,
    pub domain: FailureDomain,
    pub tcti: String,
    pub state_dir: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub endpoint: Option<Endpoint>,
    pub weight: NonZeroU32,
    pub pcrs: PcrSelection,
    pub pidfile: Option<PathBuf>,
}

impl TryFrom<Args> for Config {
    type Error = CliError;

    fn try_from(args: Args) -> Result<Self, CliError> {
        let bad = |what: String| CliError::InvalidArgument(what);
        let listen = args.listen.parse::<SocketAddr>().map_err(|_| {
            bad(format!(
                "--listen {:?}: want IP:PORT, e.g. 127.0.0.1:8444",
                args.listen
            ))
        })?;
        let host_id = HostId::new(args.host_id).map_err(|e| bad(format!("--host-id: {e}")))?;
        let endpoint = args
            .endpoint
            .map(|url| {
                if !url.starts_with("https://") {
                    return Err(bad(format!("--endpoint {url:?}: must be an https:// URL")));
                }
                Endpoint::new(url).map_err(|e| bad(format!("--endpoint: {e}")))
            })
            .transpose()?;
        Ok(Self {
            cms: args.cms.try_into()?,
            cms_key: args.cms_key,
            listen,
            host_id,
            domain: parse_domain(&args.domain)?,
            tcti: args.tcti,
            state_dir: args.state_dir,
            tls_cert: args.tls_cert,
            tls_key: args.tls_key,
            endpoint,
            weight: NonZeroU32::new(args.weight)
                .ok_or_else(|| bad("--weight: must be 1 or more".to_owned()))?,
            pcrs: parse_pcrs(&args.pcrs)?,
            pidfile: args.pidfile,
        })
    }
}

/// `region=R,operator=O`, both once, in either order.
pub fn parse_domain(text: &str) -> Result<FailureDomain, CliError> {
    let bad = |reason: String| CliError::InvalidArgument(format!("--domain {text:?}: {reason}"));
    let (mut region, mut operator) = (None, None);
    for part in text.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| bad("want region=R,operator=O".to_owned()))?;
        let value = DomainName::new(value).map_err(|e| bad(e.to_string()))?;
        let slot = match key {
            "region" => &mut region,
            "operator" => &mut operator,
            other => return Err(bad(format!("unknown key {other:?}"))),
        };
        if slot.replace(value).is_some() {
            return Err(bad(format!("{key} given twice")));
        }
    }
    match (region, operator) {
        (Some(region), Some(operator)) => Ok(FailureDomain { region, operator }),
        _ => Err(bad("needs both region= and operator=".to_owned())),
    }
}

/// `sha256:0,7`: a bank and PCR indices.
pub fn parse_pcrs(text: &str) -> Result<PcrSelection, CliError> {
    text.parse::<PcrSelection>()
        .map_err(|e| CliError::InvalidArgument(format!("--pcrs {text:?}: {e}")))
}

/// Creates the state directory (0700) when absent; refuses one another user may write.
pub fn open_state_dir(dir: &Path) -> Result<(), CliError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| state_dir_error(dir, e.to_string())),
        Err(e) => Err(state_dir_error(dir, e.to_string())),
        Ok(meta) if !meta.is_dir() => Err(state_dir_error(
            dir,
            "not a directory (a symbolic link is not taken either)".to_owned(),
        )),
        Ok(meta) => keyshard_coordinator::state_root::scan::check_owner_and_mode(dir, &meta)
            .map_err(|e| CliError::InvalidArgument(format!("--state-dir {e}"))),
    }
}

fn state_dir_error(dir: &Path, reason: String) -> CliError {
    CliError::InvalidArgument(format!("--state-dir {}: {reason}", dir.display()))
}

/// The decrypt key of `DIR/decrypt-key`, or a new one made by the TPM and written there.
pub fn load_or_create_decrypt_key(
    tpm: &TpmService,
    dir: &Path,
) -> Result<(DecryptKey, bool), CliError> {
    let path = dir.join(DECRYPT_KEY_FILE);
    if path.exists() {
        let bytes = files::read_limited(&path, MAX_DECRYPT_KEY_FILE_LEN)?;
        let key = DecryptKey::parse(&bytes).map_err(|e| {
            CliError::InvalidArgument(format!("{}: not a decrypt key: {e}", path.display()))
        })?;
        return Ok((key, false));
    }
    let key = tpm.create_decrypt_key()?;
    files::write_private(&path, &key.to_bytes(), Overwrite::Refuse)?;
    Ok((key, true))
}

/// What registering needs, cloned into the re-registration task.
#[derive(Clone)]
struct Registrar {
    cms: CmsClient,
    tpm: TpmService,
    key: DecryptKey,
    id: HostId,
    domain: FailureDomain,
    endpoint: Endpoint,
    weight: NonZeroU32,
    pcrs: PcrSelection,
}

impl Registrar {
    /// Registers; when the CMS answers `not_enrolled` (this AK is not pinned to the id yet),
    /// enrols the AK first and registers again.
    async fn enrol_and_register(&self) -> Result<HostRegistered, CliError> {
        match self.register().await {
            Err(CliError::Credential(CredentialCliError::Refused { code, .. }))
                if code == "not_enrolled" =>
            {
                let ak_name = self.enrol().await?;
                log::info!("enrolled: ak name {}", hex::encode(ak_name));
                self.register().await
            }
            other => other,
        }
    }

    /// Enrolment (spec A) on the TPM's own thread: it needs the TPM between two requests.
    async fn enrol(&self) -> Result<AkName, CliError> {
        let (cms, id, tpm) = (self.cms.clone(), self.id.to_string(), self.tpm.clone());
        tokio::task::spawn_blocking(move || {
            tpm.call(move |tpm| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(CliError::Runtime)?;
                runtime.block_on(enrol(&cms, EnrolmentKind::Host, &id, tpm))
            })?
        })
        .await
        .map_err(|e| CliError::InvalidArgument(format!("the enrolment task failed: {e}")))?
    }

    /// One registration: challenge, certify, PUT.
    async fn register(&self) -> Result<HostRegistered, CliError> {
        let answer: NonceResponse = self
            .cms
            .post("/v1/hosts/challenge", &serde_json::json!({}), "challenge")
            .await?;
        let nonce = Nonce::from_hex(&answer.nonce).map_err(|_| CredentialCliError::Malformed {
            what: "challenge",
            reason: "nonce is not 64 hex digits".to_owned(),
        })?;
        let (tpm, key, pcrs) = (self.tpm.clone(), self.key.clone(), self.pcrs.clone());
        let certified = tokio::task::spawn_blocking(move || {
            let certification = tpm.certify_decrypt_key(&key, nonce.as_bytes())?;
            let golden = tpm.read_pcrs(&pcrs)?;
            Ok::<_, keyshard_tpm::TpmError>((certification, golden))
        })
        .await
        .map_err(|e| CliError::InvalidArgument(format!("the TPM task failed: {e}")))?;
        let (certification, golden_pcrs) = certified?;
        let registration = HostRegistration {
            id: self.id.clone(),
            domain: self.domain.clone(),
            endpoint: self.endpoint.clone(),
            weight: self.weight,
            ak: self.tpm.ak_public().clone(),
            golden_pcrs,
            decrypt_key_public: self.key.public_area().to_vec(),
            certification,
            nonce,
        };
        self.cms
            .put(
                &format!("/v1/hosts/{}", self.id),
                &HostRegistrationRequest::from_registration(&registration),
                "registration answer",
            )
            .await
    }
}

pub fn run(config: Config) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> Result<(), CliError> {
    // Signals first: a SIGTERM that comes while the TPM opens still stops the host.
    let stop = super::cms::stop_signal()?;
    open_state_dir(&config.state_dir)?;
    let tls = server::tls::server_config(&config.tls_cert, &config.tls_key)?;
    let cms_key = load::verifying_key(&config.cms_key)?;
    let cms = CmsClient::new(&config.cms)?;
    let tpm = TpmService::spawn(TpmConfig::new(config.tcti.clone()))?;
    let (key, created) = load_or_create_decrypt_key(&tpm, &config.state_dir)?;
    log::info!(
        "decrypt key {} ({})",
        hex::encode(key.name()),
        if created { "created" } else { "loaded" }
    );
    let decrypt = TpmDecryptKey::new(tpm.clone(), key.clone()).map_err(|e| {
        CliError::InvalidArgument(format!("the stored decrypt key is not a P-256 key: {e}"))
    })?;
    let limits = Limits::default();
    let host_id = config.host_id.clone();
    let observer = Arc::new(|event: &ReleaseEvent| print_line(&event.to_string()));
    let state = HostState::with_observer(
        ShardHost::new(host_id.clone(), decrypt),
        cms_key,
        MemoryNonceBook::new(),
        observer,
    );
    let server = ShardHostServer::bind(config.listen, state, tls, limits).await?;
    let addr = server.local_addr();
    let endpoint = match &config.endpoint {
        Some(endpoint) => endpoint.clone(),
        None => Endpoint::new(format!("https://{addr}"))
            .map_err(|e| CliError::InvalidArgument(format!("the endpoint: {e}")))?,
    };
    let registrar = Registrar {
        cms,
        tpm,
        key,
        id: host_id.clone(),
        domain: config.domain,
        endpoint,
        weight: config.weight,
        pcrs: config.pcrs,
    };
    let registered = registrar.enrol_and_register().await?;
    log::info!(
        "registered as {} in {}/{} (key name {})",
        registered.id,
        registered.region,
        registered.operator,
        registered.key_name
    );
    let reregistering = tokio::spawn(reregister(registrar));
    daemon::announce(
        &format!("ready: shard host {host_id} serving on https://{addr}"),
        config.pidfile.as_deref(),
    )?;
    server.serve(stop).await;
    reregistering.abort();
    if let Some(pidfile) = &config.pidfile {
        daemon::remove_pidfile_if_ours(pidfile);
    }
    log::info!("stopped");
    Ok(())
}

/// Registers again every [`REREGISTER_EVERY`]; a failure is logged and retried at the next turn.
async fn reregister(registrar: Registrar) {
    let mut every = tokio::time::interval(REREGISTER_EVERY);
    // The first tick is immediate: the start registered already.
    every.tick().await;
    loop {
        every.tick().await;
        match registrar.enrol_and_register().await {
            Ok(registered) => log::info!("registered again (revision {})", registered.revision),
            Err(e) => log::warn!("registering again failed (retried in 20 min): {e}"),
        }
    }
}

/// One line on stdout; a closed stdout is not worth stopping the host for.
fn print_line(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Command {
        #[command(flatten)]
        args: Args,
    }

    /// The flags with `changed` ones replacing (or adding to) a valid set.
    fn parse(changed: &[(&str, &str)]) -> Result<Config, CliError> {
        use clap::Parser as _;
        let mut flags = vec![
            ("cms", "https://127.0.0.1:8443"),
            ("ca", "ca.pem"),
            ("cms-key", "cms.pub"),
            ("listen", "127.0.0.1:0"),
            ("host-id", "host-1"),
            ("domain", "region=eu,operator=acme"),
            ("tcti", "swtpm:port=2321"),
            ("state-dir", "state"),
            ("tls-cert", "c.pem"),
            ("tls-key", "k.pem"),
        ];
        for (flag, value) in changed {
            flags.retain(|(f, _)| f != flag);
            flags.push((flag, value));
        }
        let argv = std::iter::once("shard-host".to_owned())
            .chain(flags.iter().map(|(f, v)| format!("--{f}={v}")));
        Config::try_from(Command::try_parse_from(argv).unwrap().args)
    }

    #[test]
    fn item4_the_flags_are_validated_before_anything_starts() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.weight.get(), 1);
        assert_eq!(config.pcrs.to_string(), DEFAULT_PCRS);
        assert!(config.endpoint.is_none());
        for (flag, value) in [
            ("listen", "localhost:1"),
            ("weight", "0"),
            ("endpoint", "http://h:1"),
            ("pcrs", "sha256:99"),
            ("host-id", "Host"),
            ("domain", "region=eu"),
            ("cms", "http://h:1"),
        ] {
            let err = parse(&[(flag, value)]).unwrap_err().to_string();
            assert!(err.contains(&format!("--{flag}")), "{flag}={value}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn domains_need_a_region_and_an_operator_once() {
        let domain = parse_domain("operator=acme,region=eu").unwrap();
        assert_eq!(domain.region.as_str(), "eu");
        assert_eq!(domain.operator.as_str(), "acme");
        for bad in [
            "region=eu",
            "region=eu,operator=a,region=us",
            "region=eu,operator=a,zone=1",
            "region=e u,operator=a",
            "eu,acme",
            "",
        ] {
            let err = parse_domain(bad).unwrap_err().to_string();
            assert!(err.starts_with("--domain"), "{bad}: {err}");
        }
    }

    #[test]
    fn pcr_selections_read_as_bank_and_indices() {
        assert_eq!(parse_pcrs("sha256:0,7").unwrap().to_string(), "sha256:0,7");
        for bad in ["sha256", "md5:0", "sha256:x", "sha256:99", "sha256:"] {
            assert!(parse_pcrs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn item4_a_state_dir_another_user_may_write_is_refused() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("state");
        open_state_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // Opening it again is fine.
        open_state_dir(&dir).unwrap();
        for mode in [0o777, 0o720, 0o702] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = open_state_dir(&dir).unwrap_err().to_string();
            assert!(
                err.contains("writable by group or others"),
                "{mode:o}: {err}"
            );
        }
        let file = parent.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(
            open_state_dir(&file)
                .unwrap_err()
                .to_string()
                .contains("not a directory")
        );
    }
}
