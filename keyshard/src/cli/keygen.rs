//! `keyshard keygen`: a dealer key pair.

use std::path::PathBuf;

use keyshard_core::keys;

use super::CliError;
use keyshard_core::files::{self, Overwrite};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Private key file (PKCS#8 PEM, mode 0600); the public key goes to FILE.pub.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Replace existing key files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug)]
pub struct Config {
    pub private_path: PathBuf,
    pub public_path: PathBuf,
    pub overwrite: Overwrite,
}

impl TryFrom<Args> for Config {
    type Error = CliError;

    fn try_from(args: Args) -> Result<Self, CliError> {
        let mut public = args.out.clone().into_os_string();
        public.push(".pub");
        Ok(Self {
            public_path: public.into(),
            private_path: args.out,
            overwrite: if args.force {
                Overwrite::Replace
            } else {
                Overwrite::Refuse
            },
        })
    }
}

pub fn run(config: Config) -> Result<(), CliError> {
    files::check_writable(&config.private_path, config.overwrite)?;
    files::check_writable(&config.public_path, config.overwrite)?;
    let key = keys::generate().map_err(|e| CliError::Random(e.to_string()))?;
    let key_error = |path: &PathBuf| {
        let path = path.clone();
        move |source| CliError::Key { path, source }
    };
    let private = keys::signing_key_to_pem(&key).map_err(key_error(&config.private_path))?;
    let public =
        keys::verifying_key_to_pem(&key.verifying_key()).map_err(key_error(&config.public_path))?;
    files::write_private(&config.private_path, private.as_bytes(), config.overwrite)?;
    files::write_atomic(
        &config.public_path,
        public.as_bytes(),
        0o644,
        config.overwrite,
    )?;
    println!(
        "dealer key {} written: private {}, public {}",
        keys::fingerprint(&key.verifying_key()),
        config.private_path.display(),
        config.public_path.display()
    );
    Ok(())
}
