//! Enrolment on the host's side: the endorsement key (RSA 2048 from the TCG default template,
//! the EK its certificate in NV index 0x01c00002 certifies), the attestation key's public
//! area (whose name the credential is bound to), and TPM2_ActivateCredential, which releases a
//! credential made in software by the CMS (`keyshard_attest::tpm::credential`) only when the
//! EK and an object with the AK's name are in this TPM.

use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, ek};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::handles::{AuthHandle, KeyHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{EncryptedSecret, IdObject, Public, SymmetricDefinition};
use tss_esapi::traits::Marshall;
use zeroize::Zeroizing;

use crate::device::{Tpm, handles_from};
use crate::error::{Result, TpmError, command, kind};
use keyshard_attest::tpm::credential::MadeCredential;

/// TCG EK Credential Profile: the NV index of the RSA 2048 EK certificate.
pub const RSA_EK_CERT_NV_INDEX: u32 = 0x01c0_0002;

const RSA_2048: AsymmetricAlgorithmSelection =
    AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048);

/// The TPM's RSA 2048 endorsement key, as the TPM re-creates it from the default template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndorsementKey {
    /// The marshalled TPMT_PUBLIC.
    pub public: Vec<u8>,
    /// The RSA modulus, big-endian (the exponent is the default, 65537).
    pub modulus: Vec<u8>,
    /// The EK certificate (DER) from NV index 0x01c00002, if the manufacturer put one there.
    pub certificate: Option<Vec<u8>>,
}

impl Tpm {
    /// The RSA 2048 EK (TPM2_CreatePrimary under the endorsement hierarchy with the TCG default
    /// template, then flushed) and its certificate, if the TPM has one.
    pub fn endorsement_key(&mut self) -> Result<EndorsementKey> {
        let handle = self.load_ek()?;
        let public = self
            .ctx
            .read_public(handle)
            .map_err(command("ReadPublic"))
            .map(|(public, _, _)| public);
        let flushed = self
            .ctx
            .flush_context(handle.into())
            .map_err(command("FlushContext"));
        let public = public?;
        flushed?;
        let Public::Rsa { ref unique, .. } = public else {
            return Err(TpmError::UnexpectedResponse {
                command: "CreatePrimary",
                what: "an EK that is not RSA",
            });
        };
        let modulus = unique.value().to_vec();
        let public = public.marshall().map_err(command("ReadPublic"))?;
        let certificate = self.ek_certificate()?;
        Ok(EndorsementKey {
            public,
            modulus,
            certificate,
        })
    }

    /// The RSA EK certificate from NV, or None when the index is not defined.
    fn ek_certificate(&mut self) -> Result<Option<Vec<u8>>> {
        let defined = handles_from(&mut self.ctx, RSA_EK_CERT_NV_INDEX, |t| t == 0x01)?
            .contains(&RSA_EK_CERT_NV_INDEX);
        if !defined {
            return Ok(None);
        }
        ek::retrieve_ek_pubcert(&mut self.ctx, RSA_2048)
            .map(Some)
            .map_err(command("NV_Read"))
    }

    /// The attestation key's marshalled TPMT_PUBLIC: its SHA-256 name is what a credential is
    /// bound to, and `keyshard_attest::tpm::EccPublic::check_attestation_key` checks its shape.
    pub fn ak_public_area(&mut self) -> Result<Vec<u8>> {
        let (public, _, _) = self
            .ctx
            .read_public(self.ak)
            .map_err(command("ReadPublic"))?;
        public.marshall().map_err(command("ReadPublic"))
    }

    /// TPM2_ActivateCredential with the attestation key as the object and the RSA EK as the
    /// decrypting key (authorized by PolicySecret(endorsement)): the credential, when `made`
    /// was made to this TPM's EK for the AK's name. [`TpmError::CredentialRefused`] otherwise.
    pub fn activate_credential(&mut self, made: &MadeCredential) -> Result<Zeroizing<Vec<u8>>> {
        let id_object =
            IdObject::try_from(made.id_object.clone()).map_err(command("ActivateCredential"))?;
        let secret = EncryptedSecret::try_from(made.encrypted_secret.clone())
            .map_err(command("ActivateCredential"))?;
        let ek = self.load_ek()?;
        let result = self.activate_with(ek, id_object, secret);
        let flushed = self
            .ctx
            .flush_context(ek.into())
            .map_err(command("FlushContext"));
        let credential = result?;
        flushed?;
        Ok(credential)
    }

    fn activate_with(
        &mut self,
        ek: KeyHandle,
        id_object: IdObject,
        secret: EncryptedSecret,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(command("StartAuthSession"))?
            .ok_or(TpmError::UnexpectedResponse {
                command: "StartAuthSession",
                what: "no session",
            })?;
        let ak = self.ak;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .build();
        let result = self
            .ctx
            .tr_sess_set_attributes(session, attrs, mask)
            .map_err(command("StartAuthSession"))
            .and_then(|()| PolicySession::try_from(session).map_err(command("PolicySecret")))
            .and_then(|policy| {
                // The default EK's policy: PolicySecret(TPM_RH_ENDORSEMENT), whose (empty)
                // password is given in a password session.
                self.ctx
                    .execute_with_session(Some(AuthSession::Password), |c| {
                        c.policy_secret(
                            policy,
                            AuthHandle::Endorsement,
                            Default::default(),
                            Default::default(),
                            Default::default(),
                            None,
                        )
                    })
                    .map_err(command("PolicySecret"))
            })
            .and_then(|_| {
                self.ctx
                    .execute_with_sessions(
                        (Some(AuthSession::Password), Some(session), None),
                        |c| c.activate_credential(ak, ek, id_object, secret),
                    )
                    // A wrong name or altered encIdentity fails the HMAC (TPM_RC_INTEGRITY); a
                    // seed that does not decrypt with this EK is TPM_RC_VALUE in the spec, and
                    // TPM_RC_FAILURE from libtpms 0.9 (swtpm), which keeps working afterwards.
                    .map_err(|e| match kind(&e) {
                        Some(
                            Tss2ResponseCodeKind::Integrity
                            | Tss2ResponseCodeKind::Value
                            | Tss2ResponseCodeKind::Size
                            | Tss2ResponseCodeKind::Scheme
                            | Tss2ResponseCodeKind::Failure,
                        ) => TpmError::CredentialRefused,
                        _ => command("ActivateCredential")(e),
                    })
            })
            .map(|digest| Zeroizing::new(digest.value().to_vec()));
        // continueSession is set: the session outlives the command, whatever its result.
        self.flush_session(session)?;
        result
    }

    /// The RSA 2048 EK from the default template, loaded (a primary key: the same key every
    /// time from the endorsement seed).
    fn load_ek(&mut self) -> Result<KeyHandle> {
        ek::create_ek_object_2(&mut self.ctx, RSA_2048, None).map_err(command("CreatePrimary"))
    }
}
