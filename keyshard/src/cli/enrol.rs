//! Enrolment from the attester's side: proves to the CMS that this TPM's attestation key (AK)
//! sits in a genuine TPM, so the CMS pins it to a host or instance id
//! (`keyshard_cms::enrolment`). Used by `keyshard instance enroll` and by a shard host at start.
//!
//! 1. Read an EK certificate from the TPM's NV (RSA 2048 first, then ECC P-256, then ECC
//!    P-384: the first kind that has one) and the AK's public area.
//! 2. `POST /v1/enrolments`: the CMS checks the certificate's path and answers a credential
//!    made to that EK for the AK's name.
//! 3. TPM2_ActivateCredential (the credential comes out only in the TPM holding both the EK
//!    and the AK), then `POST /v1/enrolments/{enrolment}/activate` with it.
//! 4. Check that the CMS pinned this AK: its answer names the AK name computed here.
//!
//! The TPM is anything that implements [`EnrolmentTpm`]: a [`Tpm`] the caller opened, or a
//! [`TpmService`] (its TPM thread runs the commands).

use keyshard_attest::tpm::credential::{EkKind, MadeCredential};
use keyshard_attest::tpm::public::NAME_LEN;
use keyshard_attest::tpm::sha256_name;
use keyshard_cms::enrolment::{EnrolmentKind, parse_ek_kind};
use keyshard_cms::server::enrolment::{
    ActivationBody, Enrolled, EnrolmentBody, EnrolmentChallenge,
};
use keyshard_tpm::{Tpm, TpmError, TpmService};
use zeroize::Zeroizing;

use super::CliError;
use super::cms_client::CmsClient;

/// The EK kinds tried, in order.
const EK_KINDS: [EkKind; 3] = [EkKind::Rsa2048, EkKind::EccP256, EkKind::EccP384];

/// An AK's TPM name (SHA-256 name of its public area): what the CMS pins and an instance
/// policy names.
pub type AkName = [u8; NAME_LEN];

/// Why an enrolment failed on this side. One line each; the credential is never in one.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error(
        "the TPM has no EK certificate (RSA 2048, ECC P-256 or ECC P-384) in NV: a TPM \
         without one cannot prove it is genuine"
    )]
    NoEkCertificate,
    #[error("the CMS's enrolment answer is not usable: {0}")]
    Answer(String),
    #[error("the CMS pinned {kind} {id} to ak name {pinned}, not this TPM's {ours}")]
    OtherAk {
        kind: EnrolmentKind,
        id: String,
        pinned: String,
        ours: String,
    },
}

/// The TPM commands enrolment needs.
pub trait EnrolmentTpm {
    /// The first EK certificate the TPM's NV holds (RSA 2048, ECC P-256, ECC P-384), or None.
    fn ek_certificate(&mut self) -> Result<Option<Vec<u8>>, TpmError>;
    /// The AK's marshalled TPMT_PUBLIC.
    fn ak_public_area(&mut self) -> Result<Vec<u8>, TpmError>;
    /// TPM2_ActivateCredential with the AK and the EK of `made.ek`.
    fn activate_credential(
        &mut self,
        made: &MadeCredential,
    ) -> Result<Zeroizing<Vec<u8>>, TpmError>;
}

impl EnrolmentTpm for Tpm {
    fn ek_certificate(&mut self) -> Result<Option<Vec<u8>>, TpmError> {
        for kind in EK_KINDS {
            if let Some(certificate) = self.endorsement_key(kind)?.certificate {
                return Ok(Some(certificate));
            }
        }
        Ok(None)
    }

    fn ak_public_area(&mut self) -> Result<Vec<u8>, TpmError> {
        Tpm::ak_public_area(self)
    }

    fn activate_credential(
        &mut self,
        made: &MadeCredential,
    ) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        Tpm::activate_credential(self, made)
    }
}

/// Each command is one job on the service's TPM thread (the caller's thread waits for it).
impl EnrolmentTpm for TpmService {
    fn ek_certificate(&mut self) -> Result<Option<Vec<u8>>, TpmError> {
        self.call(<Tpm as EnrolmentTpm>::ek_certificate)?
    }

    fn ak_public_area(&mut self) -> Result<Vec<u8>, TpmError> {
        self.call(|tpm| tpm.ak_public_area())?
    }

    fn activate_credential(
        &mut self,
        made: &MadeCredential,
    ) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        let made = made.clone();
        self.call(move |tpm| tpm.activate_credential(&made))?
    }
}

/// Enrols `tpm`'s AK as `kind` `id` with the CMS (module documentation); the AK's name, which
/// the CMS now pins to the id. Enrolling again with the same AK is accepted by the CMS and
/// returns the same name; another AK for a pinned id is refused (`ak_conflict`).
///
/// Async for the HTTP requests; the TPM commands in between block the calling thread (a few
/// ms each on swtpm): call it where that is acceptable (a command line, a process starting).
pub async fn enrol<T: EnrolmentTpm + ?Sized>(
    http: &CmsClient,
    kind: EnrolmentKind,
    id: &str,
    tpm: &mut T,
) -> Result<AkName, CliError> {
    let ek_certificate = tpm.ek_certificate()?.ok_or(EnrolError::NoEkCertificate)?;
    let ak_public = tpm.ak_public_area()?;
    let ours = sha256_name(&ak_public);
    let body = EnrolmentBody {
        kind: kind.as_str().to_owned(),
        id: id.to_owned(),
        ek_certificate: hex::encode(ek_certificate),
        ak_public: hex::encode(&ak_public),
    };
    let challenge: EnrolmentChallenge = http
        .post("/v1/enrolments", &body, "enrolment challenge")
        .await?;
    let made = made_credential(&challenge)?;
    let credential = tpm.activate_credential(&made)?;
    // The credential is single use: once answered (right or wrong), the CMS removes the
    // enrolment, so the copies the request makes are worth nothing afterwards.
    let activation = ActivationBody {
        credential: hex::encode(credential.as_slice()),
    };
    let path = format!("/v1/enrolments/{}/activate", challenge.enrolment);
    let enrolled: Enrolled = http
        .post(&path, &activation, "enrolment activation")
        .await?;
    if enrolled.kind != kind.as_str() || enrolled.id != id {
        return Err(EnrolError::Answer(format!(
            "it enrolled {} {}, not {kind} {id}",
            enrolled.kind, enrolled.id
        ))
        .into());
    }
    if enrolled.ak_name != hex::encode(ours) {
        return Err(EnrolError::OtherAk {
            kind,
            id: id.to_owned(),
            pinned: enrolled.ak_name,
            ours: hex::encode(ours),
        }
        .into());
    }
    Ok(ours)
}

/// The CMS's challenge as ActivateCredential's input.
fn made_credential(challenge: &EnrolmentChallenge) -> Result<MadeCredential, EnrolError> {
    let unhex = |field: &str, text: &str| {
        hex::decode(text).map_err(|_| EnrolError::Answer(format!("{field} is not hex")))
    };
    let ek = parse_ek_kind(&challenge.ek)
        .ok_or_else(|| EnrolError::Answer("ek is not rsa2048, ecc-p256 or ecc-p384".to_owned()))?;
    if challenge.enrolment.len() != 64 || hex::decode(&challenge.enrolment).is_err() {
        return Err(EnrolError::Answer(
            "enrolment is not 64 hex digits".to_owned(),
        ));
    }
    Ok(MadeCredential {
        ek,
        id_object: unhex("id_object", &challenge.id_object)?,
        encrypted_secret: unhex("encrypted_secret", &challenge.encrypted_secret)?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn challenge() -> EnrolmentChallenge {
        EnrolmentChallenge {
            enrolment: "ab".repeat(32),
            ek: "ecc-p384".to_owned(),
            id_object: "0011".to_owned(),
            encrypted_secret: "22".to_owned(),
            expires_in_ms: 1,
        }
    }

    #[test]
    fn a_challenge_becomes_activate_credential_input_or_a_named_error() {
        let made = made_credential(&challenge()).unwrap();
        assert_eq!(made.ek, EkKind::EccP384);
        assert_eq!(made.id_object, vec![0, 0x11]);
        for (change, says) in [
            (
                (|c: &mut EnrolmentChallenge| c.ek = "rsa".to_owned())
                    as fn(&mut EnrolmentChallenge),
                "ek is not",
            ),
            (|c| c.id_object = "x".to_owned(), "id_object"),
            (|c| c.encrypted_secret = "0".to_owned(), "encrypted_secret"),
            (|c| c.enrolment = "../x".to_owned(), "enrolment"),
        ] {
            let mut c = challenge();
            change(&mut c);
            let err = made_credential(&c).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        }
    }
}
