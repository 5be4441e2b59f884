//! Sealing data to PCR values and unsealing it: a keyed-hash object under the storage root key
//! whose only authorization is PolicyPCR(selection, digest of the values). Both directions use
//! sessions salted with the storage root key, so the data crosses the TPM link encrypted.

use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::SessionType;
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::handles::{ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Digest, KeyedHashScheme, PublicBuilder, PublicKeyedHashParameters, SensitiveData,
    SymmetricDefinition,
};
use zeroize::Zeroizing;

use crate::blob::SealedBlob;
use crate::convert;
use crate::device::Tpm;
use crate::error::{Result, TpmError, command, kind};
use keyshard_attest::tpm::pcr::{PcrSelection, PcrValues};
use keyshard_attest::tpm::spec::MAX_SEALED_DATA;

impl Tpm {
    /// Seals `data` (1 to 128 bytes) so that it unseals only while the PCRs hold `golden`.
    /// The values need not be the current ones: provisioning may seal to the values of the
    /// next boot.
    pub fn seal(&mut self, golden: &PcrValues, data: &[u8]) -> Result<SealedBlob> {
        if data.is_empty() || data.len() > MAX_SEALED_DATA {
            return Err(TpmError::DataLength { len: data.len() });
        }
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_no_da(true)
            // Only a policy session authorizes Unseal; no password can.
            .with_user_with_auth(false)
            .with_admin_with_policy(true)
            .build()
            .map_err(command("Create"))?;
        let policy =
            Digest::try_from(golden.policy_digest().to_vec()).map_err(command("Create"))?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_auth_policy(policy)
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()
            .map_err(command("Create"))?;
        // tss-esapi zeroizes SensitiveData on drop.
        let sensitive = SensitiveData::try_from(data.to_vec()).map_err(command("Create"))?;
        // An HMAC session salted with the SRK, decrypt set: the data travels encrypted.
        let session = self.salted_session(SessionType::Hmac)?;
        let srk = self.srk;
        let (sattrs, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_continue_session(true)
            .build();
        let created = self
            .ctx
            .tr_sess_set_attributes(session, sattrs, mask)
            .and_then(|()| {
                self.ctx.execute_with_session(Some(session), |c| {
                    c.create(srk, public, None, Some(sensitive), None, None)
                })
            })
            .map_err(command("Create"));
        self.flush_session(session)?;
        let created = created?;
        Ok(SealedBlob::from_tpm(
            golden.selection().clone(),
            &created.out_public,
            &created.out_private,
        )?)
    }

    /// Reads the selected PCRs and seals `data` to their current values; returns the blob and
    /// the values (the golden values to verify quotes against).
    pub fn seal_current(
        &mut self,
        selection: &PcrSelection,
        data: &[u8],
    ) -> Result<(SealedBlob, PcrValues)> {
        let golden = self.read_pcrs(selection)?;
        let blob = self.seal(&golden, data)?;
        Ok((blob, golden))
    }

    /// Loads `blob` under the storage root key, satisfies PolicyPCR in a policy session salted
    /// with the storage root key, and unseals. [`TpmError::PolicyRefused`] when the PCRs no
    /// longer hold the sealed-to values; [`TpmError::ForeignBlob`] when this TPM cannot load it.
    pub fn unseal(&mut self, blob: &SealedBlob) -> Result<Zeroizing<Vec<u8>>> {
        let (public, private) = blob.tpm_parts()?;
        let srk = self.srk;
        // Load carries no secret (the private area is encrypted to the SRK): password auth.
        let object = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.load(srk, private, public)
            })
            .map_err(|e| match kind(&e) {
                Some(Tss2ResponseCodeKind::Integrity) => TpmError::ForeignBlob,
                _ => command("Load")(e),
            })?;
        let result = self.unseal_loaded(object.into(), blob.selection());
        let flushed = self
            .ctx
            .flush_context(object.into())
            .map_err(command("FlushContext"));
        let data = result?;
        flushed?;
        Ok(data)
    }

    fn unseal_loaded(
        &mut self,
        object: ObjectHandle,
        selection: &PcrSelection,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let list = convert::selection_list(selection)?;
        let session = self.salted_session(SessionType::Policy)?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_encrypt(true)
            .with_continue_session(true)
            .build();
        let refused = |e: tss_esapi::Error| match kind(&e) {
            Some(Tss2ResponseCodeKind::PolicyFail | Tss2ResponseCodeKind::PcrChanged) => {
                TpmError::PolicyRefused {
                    selection: selection.to_string(),
                }
            }
            _ => command("Unseal")(e),
        };
        let result = self
            .ctx
            .tr_sess_set_attributes(session, attrs, mask)
            .map_err(command("StartAuthSession"))
            .and_then(|()| {
                let policy = PolicySession::try_from(session).map_err(command("PolicyPCR"))?;
                // An empty pcrDigest: the TPM takes its current values, and Unseal compares
                // the resulting policy with the object's authPolicy.
                self.ctx
                    .policy_pcr(policy, Digest::default(), list)
                    .map_err(command("PolicyPCR"))
            })
            .and_then(|()| {
                self.ctx
                    .execute_with_session(Some(session), |c| c.unseal(object))
                    .map_err(refused)
            })
            .map(|data| Zeroizing::new(data.value().to_vec()));
        self.flush_session(session)?;
        result
    }

    /// A session salted with the storage root key (ECDH), AES-128-CFB parameter encryption.
    pub(crate) fn salted_session(&mut self, kind: SessionType) -> Result<AuthSession> {
        self.ctx
            .start_auth_session(
                Some(self.srk),
                None,
                None,
                kind,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(command("StartAuthSession"))?
            .ok_or(TpmError::UnexpectedResponse {
                command: "StartAuthSession",
                what: "no session",
            })
    }

    pub(crate) fn flush_session(&mut self, session: AuthSession) -> Result<()> {
        self.ctx
            .flush_context(SessionHandle::from(session).into())
            .map_err(command("FlushContext"))
    }
}
