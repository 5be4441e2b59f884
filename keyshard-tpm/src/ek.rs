//! Enrolment on the host's side: the endorsement key (RSA 2048, ECC P-256 or ECC P-384 from
//! the TCG default templates, the EKs their certificates in NV certify), the attestation key's
//! public area (whose name the credential is bound to), and TPM2_ActivateCredential, which
//! releases a credential made in software by the CMS (`keyshard_attest::tpm::credential`)
//! only when the EK and an object with the AK's name are in this TPM.

use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, ek};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::handles::{AuthHandle, KeyHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{EncryptedSecret, IdObject, Public, SymmetricDefinition};
use tss_esapi::traits::Marshall;
use zeroize::Zeroizing;

use crate::device::{Tpm, handles_from};
use crate::error::{Result, TpmError, command, kind};
use keyshard_attest::tpm::credential::{EkKind, MadeCredential};

/// TCG EK Credential Profile: the NV index of an EK kind's certificate.
pub fn ek_cert_nv_index(kind: EkKind) -> u32 {
    match kind {
        EkKind::Rsa2048 => 0x01c0_0002,
        EkKind::EccP256 => 0x01c0_000a,
        EkKind::EccP384 => 0x01c0_0016,
    }
}

fn selection(kind: EkKind) -> AsymmetricAlgorithmSelection {
    match kind {
        EkKind::Rsa2048 => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        EkKind::EccP256 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
        EkKind::EccP384 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP384),
    }
}

/// An endorsement key as the TPM re-creates it from its default template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndorsementKey {
    /// Which EK (and so which template and certificate index).
    pub kind: EkKind,
    /// The marshalled TPMT_PUBLIC.
    pub public: Vec<u8>,
    /// The public key's bytes: the RSA modulus (the exponent is 65537), or the ECC point's
    /// x || y, big-endian.
    pub key: Vec<u8>,
    /// The EK certificate (DER) from the kind's NV index, if the manufacturer put one there.
    pub certificate: Option<Vec<u8>>,
}

impl Tpm {
    /// The EK of `kind` (TPM2_CreatePrimary under the endorsement hierarchy with the TCG
    /// default template, then flushed) and its certificate, if the TPM has one.
    pub fn endorsement_key(&mut self, kind: EkKind) -> Result<EndorsementKey> {
        let handle = self.load_ek(kind)?;
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
        let key = match (&public, kind) {
            (Public::Rsa { unique, .. }, EkKind::Rsa2048) => unique.value().to_vec(),
            (Public::Ecc { unique, .. }, EkKind::EccP256 | EkKind::EccP384) => {
                [unique.x().value(), unique.y().value()].concat()
            }
            _ => {
                return Err(TpmError::UnexpectedResponse {
                    command: "CreatePrimary",
                    what: "an EK of another kind than asked for",
                });
            }
        };
        let public = public.marshall().map_err(command("ReadPublic"))?;
        let certificate = self.ek_certificate(kind)?;
        Ok(EndorsementKey {
            kind,
            public,
            key,
            certificate,
        })
    }

    /// The EK certificate of `kind` from NV, or None when its index is not defined.
    fn ek_certificate(&mut self, kind: EkKind) -> Result<Option<Vec<u8>>> {
        let index = ek_cert_nv_index(kind);
        let defined = handles_from(&mut self.ctx, index, |t| t == 0x01)?.contains(&index);
        if !defined {
            return Ok(None);
        }
        ek::retrieve_ek_pubcert(&mut self.ctx, selection(kind))
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

    /// TPM2_ActivateCredential with the attestation key as the object and the EK of `made.ek`
    /// as the decrypting key: the credential, when `made` was made to this TPM's EK for the
    /// AK's name. [`TpmError::CredentialRefused`] otherwise. The RSA 2048 and P-256 EKs (L
    /// templates) are authorized by PolicySecret(endorsement); the P-384 EK (H-3 template has
    /// userWithAuth) by its empty password.
    pub fn activate_credential(&mut self, made: &MadeCredential) -> Result<Zeroizing<Vec<u8>>> {
        let id_object =
            IdObject::try_from(made.id_object.clone()).map_err(command("ActivateCredential"))?;
        let secret = EncryptedSecret::try_from(made.encrypted_secret.clone())
            .map_err(command("ActivateCredential"))?;
        let ek = self.load_ek(made.ek)?;
        let result = match made.ek {
            EkKind::Rsa2048 | EkKind::EccP256 => self.activate_with_policy(ek, id_object, secret),
            EkKind::EccP384 => self.activate(ek, id_object, secret, AuthSession::Password),
        };
        let flushed = self
            .ctx
            .flush_context(ek.into())
            .map_err(command("FlushContext"));
        let credential = result?;
        flushed?;
        Ok(credential)
    }

    fn activate_with_policy(
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
            .and_then(|_| self.activate(ek, id_object, secret, session));
        // continueSession is set: the session outlives the command, whatever its result.
        self.flush_session(session)?;
        result
    }

    /// ActivateCredential itself: the AK by its (empty) password, the EK by `ek_auth`.
    fn activate(
        &mut self,
        ek: KeyHandle,
        id_object: IdObject,
        secret: EncryptedSecret,
        ek_auth: AuthSession,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let ak = self.ak;
        self.ctx
            .execute_with_sessions((Some(AuthSession::Password), Some(ek_auth), None), |c| {
                c.activate_credential(ak, ek, id_object, secret)
            })
            // A wrong name or altered encIdentity fails the HMAC (TPM_RC_INTEGRITY); a seed
            // that does not decrypt with this EK is TPM_RC_VALUE in the spec, and
            // TPM_RC_FAILURE from libtpms 0.9 (swtpm), which keeps working afterwards; an ECC
            // point off the curve is TPM_RC_ECC_POINT.
            .map_err(|e| match kind(&e) {
                Some(
                    Tss2ResponseCodeKind::Integrity
                    | Tss2ResponseCodeKind::Value
                    | Tss2ResponseCodeKind::Size
                    | Tss2ResponseCodeKind::Scheme
                    | Tss2ResponseCodeKind::EccPoint
                    | Tss2ResponseCodeKind::Failure,
                ) => TpmError::CredentialRefused,
                _ => command("ActivateCredential")(e),
            })
            .map(|digest| Zeroizing::new(digest.value().to_vec()))
    }

    /// The EK of `kind` from its default template, loaded (a primary key: the same key every
    /// time from the endorsement seed).
    fn load_ek(&mut self, kind: EkKind) -> Result<KeyHandle> {
        ek::create_ek_object_2(&mut self.ctx, selection(kind), None)
            .map_err(command("CreatePrimary"))
    }
}
