//! `keyshard-guest unlock`: read the fragment devices, ask the broker for the attested shares,
//! and rebuild the secret the manifest names; the secret goes raw to stdout (never a terminal)
//! or to a 0600 file.

use std::path::PathBuf;

use keyshard_core::manifest::Manifest;

use super::sources::{SourceArgs, SourceConfig};
use super::{CliError, PROGRAM};
use crate::agent;
use crate::snp;
use crate::worker::WorkerLauncher;
use keyshard_core::files::{self, Overwrite, SecretSink};

/// A manifest is well under a kilobyte per holder; anything this large is not one.
const MAX_MANIFEST_LEN: usize = 64 * 1024;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The guest manifest: the dealer public key, key id, k and holders to trust.
    #[arg(long, value_name = "FILE")]
    pub manifest: PathBuf,
    #[command(flatten)]
    pub sources: SourceArgs,
    /// Write the secret to FILE (mode 0600) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Replace an existing --out file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug)]
pub struct Config {
    pub manifest: PathBuf,
    pub sources: SourceConfig,
    pub sink: SecretSink,
}

impl TryFrom<Args> for Config {
    type Error = CliError;

    fn try_from(args: Args) -> Result<Self, CliError> {
        if args.force && args.out.is_none() {
            return Err(CliError::InvalidArgument(
                "--force replaces an --out file; there is none".into(),
            ));
        }
        Ok(Self {
            manifest: args.manifest,
            sources: args.sources.try_into()?,
            sink: SecretSink::new(
                args.out,
                if args.force {
                    Overwrite::Replace
                } else {
                    Overwrite::Refuse
                },
            ),
        })
    }
}

pub fn run(config: Config) -> Result<(), CliError> {
    let text = files::read_text(&config.manifest, MAX_MANIFEST_LEN)?;
    let manifest = Manifest::parse(&text).map_err(|source| CliError::Manifest {
        path: config.manifest.clone(),
        source,
    })?;
    // Refuse a bad destination before any device is read.
    config.sink.check()?;
    let snp = snp::is_snp_guest();
    if snp {
        log::info!("an SEV-SNP guest: sev shares are asked for with an attestation report");
    }
    let inputs = config.sources.inputs(&WorkerLauncher::this_program(), snp);
    let outcome = agent::unlock_with(&manifest, inputs, config.sources.timeout)?;
    for rejection in &outcome.rejected {
        log::warn!("skipped {}: {}", rejection.source, rejection.reason);
    }
    config.sink.deliver(&outcome.secret)?;
    let used: Vec<&str> = outcome.used.iter().map(|u| u.source.as_str()).collect();
    eprintln!(
        "{PROGRAM}: rebuilt key {} (epoch {}) from {} fragments (k = {}): {}",
        outcome.key_id,
        outcome.epoch,
        outcome.used.len(),
        outcome.k,
        used.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use clap::Parser;

    use super::*;
    use crate::cli::sources::{BrokerSelection, SourceSelection};
    use crate::cli::{Cli, Command};
    use crate::source::SourceSpec;

    fn parse(extra: &[&str]) -> Result<Config, CliError> {
        let argv = ["keyshard-guest", "unlock"].iter().chain(extra);
        let Command::Unlock(args) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not the unlock subcommand");
        };
        Config::try_from(args)
    }

    #[test]
    fn arguments_become_a_config() {
        let config = parse(&[
            "--manifest",
            "/etc/keyshard/manifest.toml",
            "--vhost-user",
            "/run/vhd-1.sock",
            "--device",
            "/dev/vdc",
            "--out",
            "/run/key",
            "--timeout",
            "0.5",
        ])
        .unwrap();
        assert_eq!(config.manifest, Path::new("/etc/keyshard/manifest.toml"));
        assert_eq!(
            config.sink,
            SecretSink::File {
                path: "/run/key".into(),
                overwrite: Overwrite::Refuse
            }
        );
        assert_eq!(config.sources.timeout, Duration::from_millis(500));
        assert_eq!(
            config.sources.selection,
            SourceSelection::Named(vec![
                SourceSpec::VhostUser("/run/vhd-1.sock".into()),
                SourceSpec::Device("/dev/vdc".into()),
            ])
        );
        let config = parse(&["--manifest", "m", "--out", "k", "--force"]).unwrap();
        assert!(matches!(
            config.sink,
            SecretSink::File {
                overwrite: Overwrite::Replace,
                ..
            }
        ));
        assert_eq!(config.sources.selection, SourceSelection::Discover);
    }

    #[test]
    fn contradictory_or_invalid_arguments_are_refused() {
        let error = parse(&["--manifest", "m", "--force"]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "--force replaces an --out file; there is none"
        );
        let error = parse(&["--manifest", "m", "--timeout=-3"]).unwrap_err();
        assert_eq!(error.to_string(), "--timeout -3: must be more than 0");
        let error = parse(&["--manifest", "m", "--device", "x", "--device", "x"]).unwrap_err();
        assert_eq!(error.to_string(), "--device x is given twice");
        // Without a manifest there is nothing to trust: clap refuses.
        assert!(Cli::try_parse_from(["keyshard-guest", "unlock"]).is_err());
    }

    #[test]
    fn an_existing_out_file_is_refused_before_reading_any_device() {
        let dir = tempfile::tempdir().unwrap();
        let dealt = crate::testing::dealt_fragments(2);
        let manifest = dir.path().join("manifest.toml");
        std::fs::write(&manifest, dealt.manifest.to_toml()).unwrap();
        let out = dir.path().join("key");
        std::fs::write(&out, b"old").unwrap();
        let config = Config {
            manifest,
            sources: SourceConfig {
                // Would fail loudly if read: there is no such sysfs tree.
                selection: SourceSelection::Discover,
                broker: BrokerSelection::Discover,
                timeout: Duration::from_secs(1),
                device_wait: Duration::from_secs(1),
                sysfs_root: dir.path().join("no-sysfs"),
                dev_root: dir.path().join("no-dev"),
            },
            sink: SecretSink::new(Some(out.clone()), Overwrite::Refuse),
        };
        assert!(matches!(
            run(config),
            Err(CliError::File(files::FileError::Exists { .. }))
        ));
        assert_eq!(std::fs::read(&out).unwrap(), b"old");
    }
}
