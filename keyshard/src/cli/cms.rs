//! `keyshard cms`: the credential management service, the `/v1/` JSON API over HTTPS
//! (`keyshard_cms::server`) on a redb or etcd store, until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use keyshard_attest::tpm::ek_cert::CaBundle;
use keyshard_cms::admission::HostAdmission;
use keyshard_cms::server::{self, CmsServer, Limits};
use keyshard_cms::store::{Store, StoreUrl};
use vhost_keyshard::daemon;

use super::CliError;

/// The store when `--store` is not given: one node, embedded.
pub const DEFAULT_STORE: &str = "redb:/var/lib/keyshard/cms.redb";

/// The address when `--listen` is not given: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address and port to serve HTTPS on (port 0: any free port, printed on the ready line).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// The store: redb:PATH (one node, created when missing) or etcd:http://HOST:PORT[,...].
    #[arg(long, value_name = "URL", default_value = DEFAULT_STORE)]
    pub store: String,
    /// The server's certificate chain, PEM, leaf first.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: PathBuf,
    /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE")]
    pub tls_key: PathBuf,
    /// The CMS's Ed25519 key (PEM, from `keyshard keygen --out FILE`): signs every fragment and
    /// shard map; clients and instances check them against FILE.pub. Required: the server
    /// refuses to start without it rather than make a key nobody trusts yet.
    #[arg(long, value_name = "FILE")]
    pub signing_key: PathBuf,
    /// The CA certificates (PEM bundle: roots and intermediates) that TPM EK certificates
    /// must chain to for enrolment (`POST /v1/enrolments`); without it enrolment is disabled
    /// (503 `enrolment_disabled`), and so is registering hosts and instances.
    #[arg(long, value_name = "FILE")]
    pub ek_ca: Option<PathBuf>,
    /// The operator's list of admitted shard hosts (JSON: `{"hosts": [{"id", "region",
    /// "operator", "max_weight"?, "ek_sha256"?}]}`): only listed host ids enrol and register,
    /// in their listed region and operator, at most their weight, and with `ek_sha256` only by
    /// that TPM. With `--ek-ca` it is required unless `--allow-any-host` is given.
    #[arg(long, value_name = "FILE")]
    pub hosts: Option<PathBuf>,
    /// With `--ek-ca` and no `--hosts`: let any host with a genuine TPM enrol and register under
    /// the id, region, operator and placement weight it claims. Without this flag such a CMS
    /// refuses to start.
    #[arg(long, conflicts_with = "hosts")]
    pub allow_any_host: bool,
    /// Write the process id here once the server listens.
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
}

#[derive(Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub store: StoreUrl,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub signing_key: PathBuf,
    pub ek_ca: Option<PathBuf>,
    pub hosts: Option<PathBuf>,
    /// `--allow-any-host`: host enrolment is open to every genuine TPM (only with `--ek-ca`).
    pub allow_any_host: bool,
    pub pidfile: Option<PathBuf>,
}

/// Why a CMS with `--ek-ca`, without `--hosts` and without `--allow-any-host` does not start.
pub const OPEN_ADMISSION_REFUSED: &str = "--ek-ca without --hosts would let any host with a \
    genuine TPM register under the id, region, operator and weight it claims: give --hosts FILE \
    (the admitted hosts) or --allow-any-host";

/// What `--allow-any-host` leaves open, printed on stdout when the CMS starts with it.
pub const OPEN_ADMISSION_NOTICE: &str = "warning: --allow-any-host: any host with a genuine TPM \
    may enrol; it claims its own id, region, operator and placement weight, so nothing stops one \
    party from posing as several failure domains or attracting most shares with a large weight";

impl TryFrom<Args> for Config {
    type Error = CliError;

    fn try_from(args: Args) -> Result<Self, CliError> {
        let listen = args.listen.parse::<SocketAddr>().map_err(|_| {
            CliError::InvalidArgument(format!(
                "--listen {:?}: want IP:PORT, e.g. 127.0.0.1:8443 or [::1]:8443",
                args.listen
            ))
        })?;
        let store = args
            .store
            .parse::<StoreUrl>()
            .map_err(|e| CliError::InvalidArgument(format!("--store: {e}")))?;
        if args.ek_ca.is_some() && args.hosts.is_none() && !args.allow_any_host {
            return Err(CliError::InvalidArgument(OPEN_ADMISSION_REFUSED.to_owned()));
        }
        Ok(Self {
            listen,
            store,
            tls_cert: args.tls_cert,
            tls_key: args.tls_key,
            signing_key: args.signing_key,
            ek_ca: args.ek_ca,
            hosts: args.hosts,
            allow_any_host: args.allow_any_host,
            pidfile: args.pidfile,
        })
    }
}

/// The store as the ready line names it.
fn describe(store: &StoreUrl) -> String {
    match store {
        StoreUrl::Redb(path) => format!("redb:{}", path.display()),
        StoreUrl::Etcd(endpoints) => format!(
            "etcd:{}",
            endpoints
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
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
    // Signals first: a SIGTERM that comes while the store opens still stops the server.
    let stop = stop_signal()?;
    let tls = server::tls::server_config(&config.tls_cert, &config.tls_key)?;
    let signing_key = super::load::signing_key(&config.signing_key)?;
    log::info!(
        "signing with key {}",
        keyshard_core::keys::fingerprint(&signing_key.verifying_key())
    );
    let ek_ca = config.ek_ca.as_deref().map(ek_ca_bundle).transpose()?;
    match &ek_ca {
        Some(bundle) => log::info!(
            "enrolment: EK certificates must chain to {} CA certificate(s)",
            bundle.len()
        ),
        None => {
            log::warn!("no --ek-ca: enrolment is disabled, hosts and instances cannot register")
        }
    }
    let admission = config.hosts.as_deref().map(host_list).transpose()?;
    match &admission {
        Some(list) => log::info!("admitting the {} hosts of --hosts only", list.len()),
        None if ek_ca.is_some() && config.allow_any_host => {
            use std::io::Write as _;
            // On stdout too, where the operator reads the ready line; a closed stdout is not
            // worth failing over (the log has it).
            let _ = writeln!(std::io::stdout().lock(), "{OPEN_ADMISSION_NOTICE}");
            log::warn!("{OPEN_ADMISSION_NOTICE}");
        }
        None => {}
    }
    let store = Store::open_url(&config.store).await?;
    let server = CmsServer::bind_admitting(
        config.listen,
        store,
        tls,
        Limits::default(),
        signing_key,
        ek_ca,
        admission,
    )
    .await?;
    daemon::announce(
        &format!(
            "ready: cms listening on https://{} (store {})",
            server.local_addr(),
            describe(&config.store)
        ),
        config.pidfile.as_deref(),
    )?;
    server.serve(stop).await;
    if let Some(pidfile) = &config.pidfile {
        daemon::remove_pidfile_if_ours(pidfile);
    }
    log::info!("stopped");
    Ok(())
}

/// The largest `--hosts` file read.
const MAX_HOSTS_LEN: usize = 1024 * 1024;

/// Reads and parses the `--hosts` list; an unreadable or bad file is an error naming it.
fn host_list(path: &Path) -> Result<HostAdmission, CliError> {
    let json = keyshard_core::files::read_limited(path, MAX_HOSTS_LEN)?;
    HostAdmission::parse(&json)
        .map_err(|e| CliError::InvalidArgument(format!("--hosts {}: {e}", path.display())))
}

/// The largest `--ek-ca` file read.
const MAX_EK_CA_LEN: usize = 1024 * 1024;

/// Reads the `--ek-ca` PEM bundle; a missing, unreadable or certificate-less file is an error
/// naming it.
fn ek_ca_bundle(path: &Path) -> Result<CaBundle, CliError> {
    let pem = keyshard_core::files::read_limited(path, MAX_EK_CA_LEN)?;
    CaBundle::from_pem(&pem)
        .map_err(|e| CliError::InvalidArgument(format!("--ek-ca {}: {e}", path.display())))
}

/// A future that completes at the first SIGTERM or SIGINT.
pub(crate) fn stop_signal() -> Result<impl std::future::Future<Output = ()>, CliError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(CliError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(CliError::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM: stopping"),
            _ = int.recv() => log::info!("SIGINT: stopping"),
        }
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Command {
        #[command(flatten)]
        args: Args,
    }

    fn parse(extra: &[&str]) -> Result<Config, CliError> {
        let mut argv = vec![
            "cms",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--signing-key",
            "s.pem",
        ];
        argv.extend_from_slice(extra);
        Config::try_from(Command::try_parse_from(argv).unwrap().args)
    }

    #[test]
    fn defaults_are_loopback_and_an_embedded_store() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.listen, DEFAULT_LISTEN.parse::<SocketAddr>().unwrap());
        assert!(config.listen.ip().is_loopback());
        assert_eq!(describe(&config.store), DEFAULT_STORE);
        let etcd = parse(&["--store", "etcd:http://127.0.0.1:2379,http://h:1"]).unwrap();
        assert_eq!(
            describe(&etcd.store),
            "etcd:http://127.0.0.1:2379,http://h:1"
        );
    }

    #[test]
    fn the_signing_key_is_required() {
        let argv = ["cms", "--tls-cert", "c.pem", "--tls-key", "k.pem"];
        let err = Command::try_parse_from(argv).unwrap_err().to_string();
        assert!(err.contains("--signing-key"), "{err}");
    }

    #[test]
    fn an_ek_ca_file_without_certificates_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ek-ca.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let err = ek_ca_bundle(&empty).unwrap_err().to_string();
        assert!(
            err.contains("--ek-ca") && err.contains("ek-ca.pem"),
            "{err}"
        );
        let missing = ek_ca_bundle(&dir.path().join("nope.pem")).unwrap_err();
        assert!(missing.to_string().contains("nope.pem"), "{missing}");
        let config = parse(&["--ek-ca", "ca.pem", "--allow-any-host"]).unwrap();
        assert_eq!(config.ek_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(parse(&[]).unwrap().ek_ca, None);
    }

    #[test]
    fn closed_host_admission_is_the_default_with_ek_ca() {
        let err = parse(&["--ek-ca", "ca.pem"]).unwrap_err().to_string();
        assert!(
            err.contains("--hosts") && err.contains("--allow-any-host") && !err.contains('\n'),
            "{err}"
        );
        let listed = parse(&["--ek-ca", "ca.pem", "--hosts", "hosts.json"]).unwrap();
        assert!(!listed.allow_any_host);
        assert!(
            parse(&["--ek-ca", "ca.pem", "--allow-any-host"])
                .unwrap()
                .allow_any_host
        );
        // Without --ek-ca nothing enrols, so nothing needs admitting.
        assert!(parse(&[]).is_ok());
        let argv = [
            "cms",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--signing-key",
            "s.pem",
            "--hosts",
            "h.json",
            "--allow-any-host",
        ];
        assert!(Command::try_parse_from(argv).is_err());
    }

    #[test]
    fn bad_addresses_and_stores_are_one_line_errors() {
        for (extra, says) in [
            (&["--listen", "localhost:8443"][..], "--listen"),
            (&["--listen", "127.0.0.1"][..], "--listen"),
            (&["--store", "sqlite:/x"][..], "--store: store URL"),
            (&["--store", "etcd:https://h:1"][..], "TLS to etcd"),
        ] {
            let err = parse(extra).unwrap_err().to_string();
            assert!(err.contains(says), "{extra:?}: {err}");
            assert!(!err.contains('\n'), "{extra:?}: {err}");
        }
    }
}
