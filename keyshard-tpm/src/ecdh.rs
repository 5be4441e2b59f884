//! A shard host's decrypt key in the TPM: made under the storage root key
//! ([`Tpm::create_decrypt_key`]), used for TPM2_ECDH_ZGen ([`Tpm::ecdh_z_gen`]: the shared
//! point of an encrypter's ephemeral key, so the private key never leaves the TPM), and
//! certified by the attestation key ([`Tpm::certify_decrypt_key`], TPM2_Certify) for the CMS,
//! which checks it with `keyshard_attest::tpm::verify_certification`.

use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::handles::{KeyHandle, ObjectHandle};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Data, EccParameter, EccPoint, SignatureScheme};
use tss_esapi::traits::Marshall;
use zeroize::Zeroizing;

use crate::decrypt_key::{self, DecryptKey};
use crate::device::Tpm;
use crate::error::{Result, TpmError, command, kind};
use crate::measurement::ecdsa_rs;
use keyshard_attest::tpm::certify::Certification;
use keyshard_attest::tpm::public::P256_POINT_LEN;
use keyshard_attest::tpm::quote::{NONCE_LEN, left_pad};

/// The shared point TPM2_ECDH_ZGen returns: d * P for the key's private scalar d and the
/// encrypter's ephemeral point P. Its x-coordinate is the ECDH shared secret Z. Both
/// coordinates are zeroized on drop.
pub struct SharedPoint {
    x: Zeroizing<[u8; 32]>,
    y: Zeroizing<[u8; 32]>,
}

impl SharedPoint {
    /// The x-coordinate, 32 bytes big-endian: the ECDH shared secret Z.
    pub fn x(&self) -> &[u8; 32] {
        &self.x
    }

    /// The y-coordinate, 32 bytes big-endian.
    pub fn y(&self) -> &[u8; 32] {
        &self.y
    }
}

/// Names no coordinate: they are secret.
impl std::fmt::Debug for SharedPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedPoint(..)")
    }
}

impl Tpm {
    /// Makes a new ECC P-256 decrypt key under the storage root key (TPM2_Create): fixedTPM,
    /// fixedParent, sensitiveDataOrigin, userWithAuth, noDA, decrypt; not restricted, no sign;
    /// ECDH scheme. The private key is generated in the TPM and leaves it only encrypted to
    /// the SRK, inside the returned [`DecryptKey`], which the caller stores.
    pub fn create_decrypt_key(&mut self) -> Result<DecryptKey> {
        let template = decrypt_key::template().map_err(command("Create"))?;
        let srk = self.srk;
        // Nothing secret goes in (no sensitive data, empty auth): password authorization.
        let created = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create(srk, template, None, None, None, None)
            })
            .map_err(command("Create"))?;
        Ok(DecryptKey::from_tpm(
            &created.out_public,
            &created.out_private,
        )?)
    }

    /// TPM2_ECDH_ZGen with `key` on `point` (uncompressed SEC1, 65 bytes: the encrypter's
    /// ephemeral public key): returns d * point. The answer crosses the TPM link encrypted (a
    /// session salted with the SRK). [`TpmError::PointFormat`] for a point of another encoding,
    /// [`TpmError::PointNotOnCurve`] when the TPM finds it is not on P-256,
    /// [`TpmError::ForeignKey`] when this TPM cannot load `key`.
    pub fn ecdh_z_gen(&mut self, key: &DecryptKey, point: &[u8]) -> Result<SharedPoint> {
        let in_point = tpm_point(point)?;
        self.with_loaded(key, |tpm, handle| {
            let session = tpm.salted_session(SessionType::Hmac)?;
            let (attrs, mask) = SessionAttributesBuilder::new()
                .with_encrypt(true)
                .with_continue_session(true)
                .build();
            let result = tpm
                .ctx
                .tr_sess_set_attributes(session, attrs, mask)
                .map_err(command("StartAuthSession"))
                .and_then(|()| {
                    tpm.ctx
                        .execute_with_session(Some(session), |c| c.ecdh_z_gen(handle, in_point))
                        .map_err(|e| match kind(&e) {
                            Some(Tss2ResponseCodeKind::EccPoint) => TpmError::PointNotOnCurve,
                            _ => command("ECDH_ZGen")(e),
                        })
                });
            tpm.flush_session(session)?;
            let out = result?;
            let mut x = Zeroizing::new([0u8; 32]);
            let mut y = Zeroizing::new([0u8; 32]);
            left_pad(&mut x[..], out.x().value())
                .zip(left_pad(&mut y[..], out.y().value()))
                .ok_or(TpmError::UnexpectedResponse {
                    command: "ECDH_ZGen",
                    what: "a coordinate longer than P-256's",
                })?;
            Ok(SharedPoint { x, y })
        })
    }

    /// TPM2_Certify of `key` by the attestation key, with `nonce` as qualifying data: the
    /// TPMS_ATTEST (type TPM_ST_ATTEST_CERTIFY, naming the key) and the AK's ECDSA signature.
    /// Before it returns, the name the TPM gives the loaded key is checked against the name
    /// computed in software from the public area, which is what the verifier computes.
    pub fn certify_decrypt_key(
        &mut self,
        key: &DecryptKey,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<Certification> {
        let data = Data::try_from(nonce.to_vec()).map_err(command("Certify"))?;
        self.with_loaded(key, |tpm, handle| {
            let (_, name, _) = tpm.ctx.read_public(handle).map_err(command("ReadPublic"))?;
            if name.value() != key.name() {
                return Err(TpmError::UnexpectedResponse {
                    command: "ReadPublic",
                    what: "another name than the public area's SHA-256 name",
                });
            }
            let ak = tpm.ak;
            // The key (ADMIN role, no adminWithPolicy) and the AK (USER role) both have empty
            // passwords; the result is signed, nothing secret crosses.
            let (attest, signature) = tpm
                .ctx
                .execute_with_sessions(
                    (
                        Some(AuthSession::Password),
                        Some(AuthSession::Password),
                        None,
                    ),
                    |c| c.certify(ObjectHandle::from(handle), ak, data, SignatureScheme::Null),
                )
                .map_err(command("Certify"))?;
            let attest = attest.marshall().map_err(command("Certify"))?;
            let signature = ecdsa_rs(signature, "Certify")?;
            Ok(Certification { attest, signature })
        })
    }

    /// Loads `key` under the SRK, runs `f` with its handle, and flushes it again whatever `f`
    /// returned.
    fn with_loaded<R>(
        &mut self,
        key: &DecryptKey,
        f: impl FnOnce(&mut Self, KeyHandle) -> Result<R>,
    ) -> Result<R> {
        let (public, private) = key.tpm_parts()?;
        let srk = self.srk;
        let handle = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.load(srk, private, public)
            })
            .map_err(|e| match kind(&e) {
                Some(Tss2ResponseCodeKind::Integrity) => TpmError::ForeignKey,
                _ => command("Load")(e),
            })?;
        let result = f(self, handle);
        let flushed = self
            .ctx
            .flush_context(handle.into())
            .map_err(command("FlushContext"));
        let value = result?;
        flushed?;
        Ok(value)
    }
}

/// An uncompressed SEC1 P-256 point as a TPMS_ECC_POINT.
fn tpm_point(point: &[u8]) -> Result<EccPoint> {
    if point.len() != P256_POINT_LEN || point.first() != Some(&0x04) {
        return Err(TpmError::PointFormat { len: point.len() });
    }
    let (x, y) = point
        .get(1..)
        .unwrap_or_default()
        .split_at_checked(32)
        .ok_or(TpmError::PointFormat { len: point.len() })?;
    let x = EccParameter::try_from(x.to_vec()).map_err(command("ECDH_ZGen"))?;
    let y = EccParameter::try_from(y.to_vec()).map_err(command("ECDH_ZGen"))?;
    Ok(EccPoint::new(x, y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_uncompressed_65_byte_points_reach_the_tpm() {
        let mut p = [0u8; 65];
        p[0] = 0x04;
        assert!(tpm_point(&p).is_ok());
        assert!(matches!(
            tpm_point(&p[..64]),
            Err(TpmError::PointFormat { len: 64 })
        ));
        p[0] = 0x02;
        assert!(matches!(
            tpm_point(&p),
            Err(TpmError::PointFormat { len: 65 })
        ));
        assert!(matches!(
            tpm_point(&[]),
            Err(TpmError::PointFormat { len: 0 })
        ));
    }

    #[test]
    fn a_shared_point_does_not_print_its_coordinates() {
        let p = SharedPoint {
            x: Zeroizing::new([0xab; 32]),
            y: Zeroizing::new([0xcd; 32]),
        };
        assert_eq!(format!("{p:?}"), "SharedPoint(..)");
    }
}
