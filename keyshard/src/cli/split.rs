//! `keyshard split`: a secret into k-of-n signed fragment files, one per `vhd` holder.

use std::fs;
use std::path::{Path, PathBuf};

use keyshard_core::dealer::{self, DealPlan, HolderSlot};
use keyshard_core::fragment::is_fragment_file;
use keyshard_core::manifest::Manifest;
use keyshard_core::sharing::MAX_SECRET_LEN;
use keyshard_core::{HolderClass, KeyCheckValue, KeyId};

use super::{CliError, load};
use keyshard_core::files::{self, Overwrite};

/// Below this many bytes a secret could be guessed offline against the key check value.
const SHORT_SECRET_WARNING: usize = 16;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The secret, as raw bytes; `-` reads stdin. Used exactly as given (a trailing newline counts).
    #[arg(long, value_name = "FILE|-")]
    pub secret_file: PathBuf,
    /// k: how many fragments rebuild the secret (at least 2).
    #[arg(long, value_name = "K")]
    pub threshold: u8,
    /// n: how many fragments to make (at most 255).
    #[arg(long, value_name = "N")]
    pub shares: u8,
    /// The dealer's private key (from `keyshard keygen`).
    #[arg(long, value_name = "FILE")]
    pub signing_key: PathBuf,
    /// Where to write fragment-1.ksf ... fragment-N.ksf (created 0700 if missing).
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
    /// Sharing epoch; a rotation uses a higher one.
    #[arg(long, value_name = "E", default_value_t = 1)]
    pub epoch: u64,
    /// Name of the secret; a random `key-…` id when omitted.
    #[arg(long, value_name = "ID")]
    pub key_id: Option<String>,
    /// Also write the guest manifest (dealer public key, key id, k, holders) to FILE.
    #[arg(long, value_name = "FILE")]
    pub manifest_out: Option<PathBuf>,
    /// Replace existing fragment and manifest files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug)]
pub struct Config {
    pub secret_file: PathBuf,
    pub signing_key: PathBuf,
    pub out_dir: PathBuf,
    pub manifest_out: Option<PathBuf>,
    pub plan: DealPlan,
    pub overwrite: Overwrite,
}

impl TryFrom<Args> for Config {
    type Error = CliError;

    fn try_from(args: Args) -> Result<Self, CliError> {
        let key_id = match args.key_id {
            Some(id) => {
                KeyId::new(id).map_err(|e| CliError::InvalidArgument(format!("--key-id: {e}")))?
            }
            None => KeyId::random().map_err(|e| CliError::Random(e.to_string()))?,
        };
        // Checked here too, so a bad k/n is reported before any file is read.
        keyshard_core::Threshold::new(args.threshold, args.shares)
            .map_err(|e| CliError::InvalidArgument(format!("--threshold/--shares: {e}")))?;
        Ok(Self {
            secret_file: args.secret_file,
            signing_key: args.signing_key,
            out_dir: args.out_dir,
            manifest_out: args.manifest_out,
            plan: DealPlan {
                key_id,
                epoch: args.epoch,
                k: args.threshold,
                holders: HolderSlot::numbered(HolderClass::Vhd, args.shares).collect(),
            },
            overwrite: if args.force {
                Overwrite::Replace
            } else {
                Overwrite::Refuse
            },
        })
    }
}

pub fn fragment_path(out_dir: &std::path::Path, index: u8) -> PathBuf {
    out_dir.join(format!("fragment-{index}.ksf"))
}

pub fn run(config: Config) -> Result<(), CliError> {
    let dealer_key = load::signing_key(&config.signing_key)?;
    let secret = files::read_limited(&config.secret_file, MAX_SECRET_LEN)?;
    if secret.is_empty() {
        return Err(CliError::InvalidArgument(format!(
            "{}: the secret is empty",
            config.secret_file.display()
        )));
    }
    if secret.len() < SHORT_SECRET_WARNING {
        log::warn!(
            "the secret is only {} bytes: a short secret can be guessed offline from any fragment's key check value",
            secret.len()
        );
    }
    let fragments = dealer::deal(&secret, &config.plan, &dealer_key)?;
    files::create_private_dir(&config.out_dir)?;
    // Refuse before writing anything, so a refused split leaves no mix of old and new fragments.
    if let Some(path) = &config.manifest_out {
        files::check_writable(path, config.overwrite)?;
    }
    for fragment in &fragments {
        files::check_writable(
            &fragment_path(&config.out_dir, fragment.header().index),
            config.overwrite,
        )?;
    }
    for fragment in &fragments {
        let path = fragment_path(&config.out_dir, fragment.header().index);
        files::write_private(&path, fragment.encoded(), config.overwrite)?;
    }
    let removed = match config.overwrite {
        Overwrite::Replace => remove_stale_fragments(&config.out_dir, config.plan.holders.len())?,
        Overwrite::Refuse => 0,
    };
    if let Some(path) = &config.manifest_out {
        let manifest = Manifest {
            key_id: config.plan.key_id.clone(),
            threshold: config.plan.k,
            key_check_value: KeyCheckValue::compute(&secret, &config.plan.key_id),
            dealer: dealer_key.verifying_key(),
            holders: config.plan.holders.clone(),
            host_attestation: None,
        };
        files::write_atomic(path, manifest.to_toml().as_bytes(), 0o644, config.overwrite)?;
    }
    println!(
        "split key {} (epoch {}) {} of {} into {}",
        config.plan.key_id,
        config.plan.epoch,
        config.plan.k,
        fragments.len(),
        config.out_dir.display()
    );
    if removed > 0 {
        println!("removed {removed} stale fragment file(s) of an earlier, larger split");
    }
    Ok(())
}

/// After `split --force` with n fragments: removes `fragment-<i>.ksf` for n < i <= 255 left by
/// an earlier split with more shares, so the directory holds one split only. Only regular files
/// that are keyshard fragments (this format, or version 1) are removed; anything else at such a
/// name is left, with a warning. Returns how many were removed.
fn remove_stale_fragments(out_dir: &Path, n: usize) -> Result<usize, CliError> {
    let mut removed = 0;
    for index in (1..=u8::MAX).filter(|i| usize::from(*i) > n) {
        let path = fragment_path(out_dir, index);
        let Ok(meta) = path.symlink_metadata() else {
            continue;
        };
        if meta.is_file() && is_fragment_file(&path) {
            fs::remove_file(&path).map_err(|source| files::FileError::Io {
                path: path.clone(),
                source,
            })?;
            removed += 1;
        } else {
            log::warn!(
                "left {}: not a keyshard fragment, so not removed as stale",
                path.display()
            );
        }
    }
    Ok(removed)
}
