//! `keyshard credential fetch`: a compute instance fetches a credential (issue 9 spec, E).
//!
//! 1. Asks the CMS for a nonce (`POST /v1/instances/{id}/challenge`), makes an ephemeral fetch
//!    key, has its TPM quote the PCRs the CMS names with qualifying data binding the nonce and
//!    that key, and sends the evidence (`POST /v1/credentials/{name}/fetch`). The CMS answers
//!    with the shard map sealed to the client key and one grant per shard.
//! 2. Opens the map with `--client-key`, checks its signature with `--cms-key`, and checks each
//!    grant against it: the grant for index i must name the map's host for i. The endpoint used
//!    is the map's (signed), never the grant's.
//! 3. Asks every host at once, each under `--host-deadline-ms` ([`host`]): the host's nonce, a
//!    quote over it with the same fetch key (the TPM quotes for one host at a time), the
//!    release; the released shard opens only with the fetch key and only as the shard of this
//!    credential, epoch, index and host. Each opened share must be a fragment the CMS signed for
//!    this credential, epoch and index ([`collect`]). As soon as k valid shares rebuild the
//!    credential (the map's key check value), the other hosts' answers are dropped.
//! 4. Writes `--out` (mode 0600, created new: an existing file is refused, never replaced);
//!    nothing is written unless the credential rebuilt.
//!
//! A host that does not answer in time, answers garbage or too much, refuses, or releases
//! something that does not open or is not the share asked for is that host's failure, named on
//! its line; the fetch fails (exit 2) only when fewer than k hosts released valid shares.
//!
//! The hosts are reached over HTTPS trusting only `--ca`, like the CMS.

pub mod api;
pub mod collect;
pub mod flow;
pub mod host;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

use keyshard_core::KeyId;
use keyshard_core::files::{self, Overwrite};
use keyshard_tpm::{TpmConfig, TpmService};

use super::credential::{CmsArgs, CmsConfig, client_key, credential_name, print_lines};
use super::{CliError, load};
use collect::{HostReport, HostStatus};

pub use flow::{Clients, FetchParams, FetchTimings, Fetched, fetch};

pub type Result<T> = std::result::Result<T, CliError>;

/// What can go wrong in a fetch besides the CMS exchange; one line each, never a secret byte.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("--instance-id {id:?}: {reason}")]
    InstanceId { id: String, reason: String },
    #[error("a fetch task failed: {0}")]
    Task(String),
    #[error(
        "credential {name} epoch {epoch}: quorum not met: {released} of {n} hosts released, {k} \
         needed; failed: {}",
        failed_hosts(hosts)
    )]
    QuorumNotMet {
        name: KeyId,
        epoch: u64,
        k: u8,
        n: u8,
        released: usize,
        hosts: Vec<HostReport>,
    },
}

/// "host-a (no answer within 5000 ms), host-b (refused ...)".
fn failed_hosts(hosts: &[HostReport]) -> String {
    let failed: Vec<String> = hosts
        .iter()
        .filter_map(|h| match &h.status {
            HostStatus::Failed(why) => Some(format!("{} ({why})", h.host)),
            _ => None,
        })
        .collect();
    if failed.is_empty() {
        "none (the released shares do not rebuild the credential)".to_owned()
    } else {
        failed.join(", ")
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub cms: CmsArgs,
    /// The CMS's verifying key (PEM): the map's and every share's signature.
    #[arg(long, value_name = "FILE")]
    pub cms_key: PathBuf,
    /// The credential's name.
    #[arg(long)]
    pub name: String,
    /// This instance's id, as enrolled with `keyshard instance enroll`.
    #[arg(long, value_name = "ID")]
    pub instance_id: String,
    /// The client's private key file (of `credential keygen`): opens the map.
    #[arg(long, value_name = "FILE")]
    pub client_key: PathBuf,
    /// The instance's TPM (TCTI), e.g. swtpm:host=127.0.0.1,port=2321.
    #[arg(long)]
    pub tcti: Option<String>,
    /// Where the credential goes (mode 0600); an existing file is refused.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Milliseconds each shard host may take (its nonce, the quote, the release).
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub host_deadline_ms: u64,
}

/// A validated `credential fetch`.
#[derive(Debug)]
pub struct Config {
    pub cms: CmsConfig,
    pub cms_key: PathBuf,
    pub name: KeyId,
    pub instance: String,
    pub client_key: PathBuf,
    pub tpm: TpmConfig,
    pub out: PathBuf,
    pub host_deadline: Duration,
}

impl TryFrom<Args> for Config {
    type Error = CliError;

    fn try_from(args: Args) -> Result<Self> {
        // An instance id has a host id's charset.
        keyshard_shards::HostId::new(args.instance_id.as_str()).map_err(|e| {
            FetchError::InstanceId {
                id: args.instance_id.clone(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            cms: args.cms.try_into()?,
            cms_key: args.cms_key,
            name: credential_name(&args.name)?,
            instance: args.instance_id,
            client_key: args.client_key,
            tpm: TpmConfig::from_flag(args.tcti.as_deref()),
            out: args.out,
            host_deadline: Duration::from_millis(args.host_deadline_ms),
        })
    }
}

/// Runs `credential fetch`: prints one line per host, then the summary; exit 2 (through
/// [`CliError::exit_code`]) when fewer than k hosts released.
pub fn run(config: Config) -> Result<()> {
    let started = std::time::Instant::now();
    // Refused before anything is asked of anyone.
    files::check_writable(&config.out, Overwrite::Refuse)?;
    let params = FetchParams {
        name: config.name.clone(),
        instance: config.instance.clone(),
        client: client_key(&config.client_key)?,
        cms_key: load::verifying_key(&config.cms_key)?,
        host_deadline: config.host_deadline,
    };
    let clients = Clients::new(&config.cms, config.host_deadline)?;
    let tpm = TpmService::spawn(config.tpm.clone())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    let set_up = started.elapsed();
    let fetching = std::time::Instant::now();
    let fetched = match runtime.block_on(fetch(&params, &clients, &tpm)) {
        Ok(fetched) => fetched,
        Err(CliError::Fetch(error @ FetchError::QuorumNotMet { .. })) => {
            if let FetchError::QuorumNotMet { hosts, .. } = &error {
                print_lines(&host_lines(hosts))?;
            }
            return Err(error.into());
        }
        Err(other) => return Err(other),
    };
    let fetch_time = fetching.elapsed();
    let writing = std::time::Instant::now();
    files::write_private(&config.out, &fetched.secret, Overwrite::Refuse)?;
    let t = &fetched.timings;
    log::debug!(
        "fetch timings: set-up (keys, HTTPS clients, TPM, runtime) {set_up:?}; fetch {fetch_time:?} \
         (challenge {:?}, quote {:?}, CMS fetch {:?}, map {:?}, hosts {:?}); write {:?}",
        t.challenge,
        t.cms_quote,
        t.cms_fetch,
        t.open_map,
        t.hosts,
        writing.elapsed()
    );
    let mut lines = host_lines(&fetched.hosts);
    lines.push(format!(
        "fetched {} epoch {} from {} of {} hosts",
        fetched.name,
        fetched.epoch,
        fetched.released(),
        fetched.n
    ));
    print_lines(&lines)
}

/// One line per host, in share index order.
pub fn host_lines(hosts: &[HostReport]) -> Vec<String> {
    hosts.iter().map(ToString::to_string).collect()
}
