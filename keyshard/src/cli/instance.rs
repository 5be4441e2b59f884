//! `keyshard instance enroll`: registers a compute instance with the CMS: its TPM's attestation
//! key (enrolment, [`super::enrol`]) and its golden PCR values, quoted by that AK over a CMS
//! nonce (`PUT /v1/instances/{id}`). The AK name it prints is what a credential's
//! `--instance-policy` pins.

use keyshard_attest::tpm::{PcrSelection, PcrValues};
use keyshard_cms::enrolment::{EnrolmentKind, check_id};
use keyshard_cms::instances::quote_to_wire;
use keyshard_cms::server::hosts::EmptyRequest;
use keyshard_cms::server::instances::{
    InstanceChallengeResponse, InstanceRegistered, InstanceRegistrationBody,
};
use keyshard_cms::store::Nonce;
use keyshard_tpm::Tpm;

use super::CliError;
use super::cms_client::CmsClient;
use super::credential::{CmsArgs, CmsConfig, runtime};
use super::enrol::{EnrolError, enrol};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Enrol this instance's TPM with the CMS and register its current PCRs as golden values.
    Enroll(EnrollArgs),
}

#[derive(Debug, clap::Args)]
pub struct EnrollArgs {
    #[command(flatten)]
    pub cms: CmsArgs,
    /// The instance's id (a-z, 0-9, '.', '_', '-'; 1 to 64).
    #[arg(long, value_name = "ID")]
    pub instance_id: String,
    /// The instance's TPM, e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321.
    #[arg(long, value_name = "TCTI")]
    pub tcti: String,
    /// The PCRs to register as golden, e.g. sha256:0,7 (default: what the CMS asks for,
    /// sha256:0,1,2,3,4,5,6,7 for a new instance).
    #[arg(long, value_name = "SELECTION")]
    pub pcrs: Option<String>,
}

/// A validated `instance enroll`.
#[derive(Debug)]
pub struct EnrollConfig {
    pub cms: CmsConfig,
    pub id: String,
    pub tcti: String,
    pub pcrs: Option<PcrSelection>,
}

impl TryFrom<EnrollArgs> for EnrollConfig {
    type Error = CliError;

    fn try_from(args: EnrollArgs) -> Result<Self, CliError> {
        check_id(EnrolmentKind::Instance, &args.instance_id)
            .map_err(|e| CliError::InvalidArgument(format!("--instance-id: {e}")))?;
        let pcrs = args
            .pcrs
            .as_deref()
            .map(str::parse::<PcrSelection>)
            .transpose()
            .map_err(|e| CliError::InvalidArgument(format!("--pcrs: {e}")))?;
        Ok(Self {
            cms: args.cms.try_into()?,
            id: args.instance_id,
            tcti: args.tcti,
            pcrs,
        })
    }
}

/// Runs an `instance` subcommand.
pub fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Enroll(args) => {
            let config: EnrollConfig = args.try_into()?;
            let (registered, golden) = runtime()?.block_on(enroll(&config))?;
            println!(
                "instance {} enrolled: ak name {}, golden {}",
                registered.id,
                registered.ak_name,
                golden.selection()
            );
            Ok(())
        }
    }
}

/// Enrols the instance's TPM, then registers its PCRs: a challenge, the PCRs read and quoted
/// over its nonce, `PUT /v1/instances/{id}`. The CMS's answer and the golden values sent.
pub async fn enroll(config: &EnrollConfig) -> Result<(InstanceRegistered, PcrValues), CliError> {
    let http = CmsClient::new(&config.cms)?;
    let mut tpm = Tpm::open(&config.tcti)?;
    let ak_name = enrol(&http, EnrolmentKind::Instance, &config.id, &mut tpm).await?;
    let challenge: InstanceChallengeResponse = http
        .post(
            &format!("/v1/instances/{}/challenge", config.id),
            &EmptyRequest {},
            "instance challenge",
        )
        .await?;
    let nonce = Nonce::from_hex(&challenge.nonce)
        .map_err(|_| EnrolError::Answer("the challenge's nonce is not 64 hex digits".to_owned()))?;
    let selection = match &config.pcrs {
        Some(selection) => selection.clone(),
        None => challenge
            .pcrs
            .parse::<PcrSelection>()
            .map_err(|e| EnrolError::Answer(format!("the challenge's pcrs: {e}")))?,
    };
    let golden = tpm.read_pcrs(&selection)?;
    let quote = tpm.quote(&selection, nonce.as_bytes())?;
    let body = InstanceRegistrationBody {
        golden_pcrs: hex::encode(golden.to_bytes()),
        nonce: nonce.to_hex(),
        quote: hex::encode(quote_to_wire(&quote)),
    };
    let registered: InstanceRegistered = http
        .put(
            &format!("/v1/instances/{}", config.id),
            &body,
            "instance registration",
        )
        .await?;
    if registered.ak_name != hex::encode(ak_name) {
        return Err(EnrolError::Answer(format!(
            "the CMS registered ak name {}, not this TPM's {}",
            registered.ak_name,
            hex::encode(ak_name)
        ))
        .into());
    }
    Ok((registered, golden))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    fn parse(extra: &[&str]) -> Result<EnrollConfig, CliError> {
        let mut argv = vec![
            "keyshard",
            "enroll",
            "--cms",
            "https://127.0.0.1:8443",
            "--ca",
            "ca.pem",
            "--tcti",
            "swtpm:port=1",
        ];
        argv.extend_from_slice(extra);
        let Command::Enroll(args) = Cli::try_parse_from(argv).unwrap().command;
        args.try_into()
    }

    #[test]
    fn ids_and_selections_are_checked_before_any_tpm_or_network() {
        let config = parse(&["--instance-id", "vm-1", "--pcrs", "sha256:7,0"]).unwrap();
        assert_eq!(config.pcrs.unwrap().to_string(), "sha256:0,7");
        assert!(parse(&["--instance-id", "vm-1"]).unwrap().pcrs.is_none());
        for (extra, says) in [
            (&["--instance-id", "VM 1"][..], "--instance-id"),
            (
                &["--instance-id", "vm", "--pcrs", "sha256:24"][..],
                "--pcrs",
            ),
            (&["--instance-id", "vm", "--pcrs", "0,7"][..], "--pcrs"),
        ] {
            let err = parse(extra).unwrap_err().to_string();
            assert!(err.contains(says), "{extra:?}: {err}");
        }
    }
}
