//! `keyshard inspect`: what a fragment says about itself, never its share bytes.

use std::path::PathBuf;

use keyshard_core::fragment::{Fragment, VERSION};
use serde::Serialize;

use super::{CliError, load};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print a JSON array instead of one line per fragment.
    #[arg(long)]
    pub json: bool,
    /// Also check each fragment's signature against this dealer public key.
    #[arg(long, value_name = "FILE.pub")]
    pub verify_key: Option<PathBuf>,
    #[arg(value_name = "FRAGMENT", required = true)]
    pub fragments: Vec<PathBuf>,
}

#[derive(Debug)]
pub struct Config {
    pub json: bool,
    pub verify_key: Option<PathBuf>,
    pub fragments: Vec<PathBuf>,
}

impl TryFrom<Args> for Config {
    type Error = CliError;

    fn try_from(args: Args) -> Result<Self, CliError> {
        Ok(Self {
            json: args.json,
            verify_key: args.verify_key,
            fragments: args.fragments,
        })
    }
}

/// One fragment's metadata as printed.
#[derive(Debug, Serialize)]
pub struct FragmentInfo {
    pub file: String,
    pub version: u8,
    pub key_id: String,
    pub epoch: u64,
    pub index: u8,
    pub k: u8,
    pub n: u8,
    /// The deal (split) the fragment belongs to: 32 hex digits.
    pub deal: String,
    pub class: String,
    pub holder_id: String,
    pub share_len: usize,
    pub kcv: String,
    /// Present when a verify key was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature_valid: Option<bool>,
}

impl FragmentInfo {
    fn line(&self) -> String {
        let signature = match self.signature_valid {
            Some(true) => ", signature valid",
            Some(false) => ", SIGNATURE INVALID",
            None => "",
        };
        format!(
            "{}: key {} epoch {} deal {} share {} of {} (k = {}), {} holder {}, {}-byte share, kcv {}{}",
            self.file,
            self.key_id,
            self.epoch,
            self.deal,
            self.index,
            self.n,
            self.k,
            self.class,
            self.holder_id,
            self.share_len,
            self.kcv,
            signature
        )
    }
}

pub fn run(config: Config) -> Result<(), CliError> {
    let dealer = config
        .verify_key
        .as_deref()
        .map(load::verifying_key)
        .transpose()?;
    let mut infos = Vec::new();
    let mut failed = 0;
    for path in &config.fragments {
        let candidate = load::fragment_candidate(path);
        let parsed = candidate
            .content
            .map_err(|why| why.to_string())
            .and_then(|bytes| Fragment::parse(&bytes).map_err(|e| e.to_string()));
        let fragment = match parsed {
            Ok(fragment) => fragment,
            Err(why) => {
                eprintln!("keyshard: {}: {why}", path.display());
                failed += 1;
                continue;
            }
        };
        let h = fragment.header().clone();
        let share_len = fragment.share_len();
        let signature_valid = dealer.as_ref().map(|key| fragment.verify(key).is_ok());
        infos.push(FragmentInfo {
            file: path.display().to_string(),
            version: VERSION,
            key_id: h.key_id.to_string(),
            epoch: h.epoch,
            index: h.index,
            k: h.threshold.k(),
            n: h.threshold.n(),
            deal: h.deal.to_string(),
            class: h.class.to_string(),
            holder_id: h.holder_id.to_string(),
            share_len,
            kcv: h.kcv.to_hex(),
            signature_valid,
        });
    }
    if config.json {
        let text = serde_json::to_string_pretty(&infos)
            .map_err(|e| CliError::InvalidArgument(e.to_string()))?;
        println!("{text}");
    } else {
        for info in &infos {
            println!("{}", info.line());
        }
    }
    let invalid_signatures = infos
        .iter()
        .filter(|i| i.signature_valid == Some(false))
        .count();
    match failed + invalid_signatures {
        0 => Ok(()),
        bad => Err(CliError::InspectFailed {
            bad,
            total: config.fragments.len(),
        }),
    }
}
