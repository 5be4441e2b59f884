//! keyshard's two persistent TPM keys: the storage root key (ECC P-256 restricted decryption,
//! parent of every sealed blob) and the attestation key (ECC P-256 restricted ECDSA-SHA256
//! signing, signs quotes). Both are primaries, created once and made persistent; afterwards the
//! key at the handle is checked against the template and reused. The SRK derives from the
//! owner hierarchy's seed; the AK from the endorsement hierarchy's, because a TPM obfuscates
//! the reset and restart counts in quotes signed by keys of other hierarchies (and because
//! TPM2_Clear leaves that seed alone, so a re-created AK is the same key).

use tss_esapi::Context;
use tss_esapi::attributes::{ObjectAttributes, ObjectAttributesBuilder};
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    EccPoint, EccScheme, HashScheme, KeyDerivationFunctionScheme, Public, PublicBuilder,
    PublicEccParameters, PublicEccParametersBuilder, SymmetricDefinitionObject,
};

use crate::device::handles_from;
use crate::error::{Result, TpmError, command};
use keyshard_attest::tpm::quote::AkPublic;

const SRK_ROLE: &str = "storage root key";
const AK_ROLE: &str = "attestation key";

/// The storage root key at `handle`, created and persisted if the handle is empty.
/// Returns the key and whether it was created now.
pub(crate) fn storage_root_key(ctx: &mut Context, handle: u32) -> Result<(KeyHandle, bool)> {
    persistent_key(ctx, handle, SRK_ROLE, Hierarchy::Owner, srk_template()?)
}

/// The attestation key at `handle`, created and persisted if the handle is empty, with its
/// public key. Returns the key, whether it was created now, and the public key.
pub(crate) fn attestation_key(
    ctx: &mut Context,
    handle: u32,
) -> Result<(KeyHandle, bool, AkPublic)> {
    let (key, created) =
        persistent_key(ctx, handle, AK_ROLE, Hierarchy::Endorsement, ak_template()?)?;
    let (public, _, _) = ctx.read_public(key).map_err(command("ReadPublic"))?;
    let Public::Ecc { unique, .. } = public else {
        return Err(TpmError::UnexpectedKey {
            handle,
            role: AK_ROLE,
            reason: "not an ECC key",
        });
    };
    let ak = AkPublic::from_coordinates(unique.x().value(), unique.y().value()).map_err(|_| {
        TpmError::UnexpectedKey {
            handle,
            role: AK_ROLE,
            reason: "its public point is not on P-256",
        }
    })?;
    Ok((key, created, ak))
}

fn persistent_key(
    ctx: &mut Context,
    handle: u32,
    role: &'static str,
    hierarchy: Hierarchy,
    template: Public,
) -> Result<(KeyHandle, bool)> {
    let persistent = PersistentTpmHandle::new(handle).map_err(|_| {
        TpmError::Config(format!(
            "{handle:#010x} is not a persistent handle (0x81000000..=0x81ffffff)"
        ))
    })?;
    // Look before reading: ReadPublic on an empty handle fails, and libtss2 logs every failure.
    let present = handles_from(ctx, 0x8100_0000, |t| t == 0x81)?.contains(&handle);
    if present {
        let mut object = ctx
            .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(persistent)))
            .map_err(command("ReadPublic"))?;
        let key = KeyHandle::from(object);
        let checked = ctx
            .read_public(key)
            .map_err(command("ReadPublic"))
            .and_then(|(public, _, _)| {
                matches_template(&public, &template).map_err(|reason| TpmError::UnexpectedKey {
                    handle,
                    role,
                    reason,
                })
            });
        if let Err(e) = checked {
            // Forget the ESYS handle; the key stays in the TPM, untouched.
            let _ = ctx.tr_close(&mut object);
            return Err(e);
        }
        return Ok((key, false));
    }
    log::info!("creating the TPM {role} at persistent handle {handle:#010x}");
    let created = ctx
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.create_primary(hierarchy, template, None, None, None, None)
        })
        .map_err(command("CreatePrimary"))?;
    let transient = ObjectHandle::from(created.key_handle);
    let evicted = ctx
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.evict_control(
                Provision::Owner,
                transient,
                Persistent::Persistent(persistent),
            )
        })
        .map_err(command("EvictControl"));
    // EvictControl leaves the transient copy loaded.
    let flushed = ctx
        .flush_context(transient)
        .map_err(command("FlushContext"));
    let object = evicted?;
    flushed?;
    Ok((KeyHandle::from(object), true))
}

/// Checks what decides a key's behaviour: type, attributes, name algorithm, policy and
/// parameters (curve, scheme, symmetric). The unique field (the public point) is not compared.
fn matches_template(actual: &Public, expected: &Public) -> std::result::Result<(), &'static str> {
    let (
        Public::Ecc {
            object_attributes: aa,
            name_hashing_algorithm: an,
            auth_policy: ap,
            parameters: apar,
            ..
        },
        Public::Ecc {
            object_attributes: ea,
            name_hashing_algorithm: en,
            auth_policy: ep,
            parameters: epar,
            ..
        },
    ) = (actual, expected)
    else {
        return Err("not an ECC key");
    };
    if aa != ea {
        return Err("its object attributes differ");
    }
    if an != en {
        return Err("its name algorithm differs");
    }
    if ap != ep {
        return Err("it has an authorization policy");
    }
    if apar != epar {
        return Err("its curve, scheme or symmetric parameters differ");
    }
    Ok(())
}

/// ECC P-256 storage key (TCG "SRK" shape): restricted decryption, AES-128-CFB for children.
pub(crate) fn srk_template() -> Result<Public> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(command("CreatePrimary"))?;
    let params = PublicEccParametersBuilder::new_restricted_decryption_key(
        SymmetricDefinitionObject::AES_128_CFB,
        EccCurve::NistP256,
    )
    .build()
    .map_err(command("CreatePrimary"))?;
    ecc_p256_public(attrs, params)
}

/// ECC P-256 restricted signing key, ECDSA with SHA-256: it signs only digests the TPM made
/// itself (quotes), never outside data that starts with TPM_GENERATED_VALUE.
pub(crate) fn ak_template() -> Result<Public> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .build()
        .map_err(command("CreatePrimary"))?;
    let params = PublicEccParametersBuilder::new()
        .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
        .with_curve(EccCurve::NistP256)
        .with_is_signing_key(true)
        .with_is_decryption_key(false)
        .with_restricted(true)
        .with_symmetric(SymmetricDefinitionObject::Null)
        .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
        .build()
        .map_err(command("CreatePrimary"))?;
    ecc_p256_public(attrs, params)
}

/// The part both templates share: an ECC key named with SHA-256, its point left to the TPM.
fn ecc_p256_public(attrs: ObjectAttributes, params: PublicEccParameters) -> Result<Public> {
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(params)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(command("CreatePrimary"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_templates_do_not_match_each_other() {
        let srk = srk_template().unwrap();
        let ak = ak_template().unwrap();
        assert_eq!(matches_template(&srk, &srk), Ok(()));
        assert_eq!(matches_template(&ak, &ak), Ok(()));
        assert_eq!(
            matches_template(&ak, &srk),
            Err("its object attributes differ")
        );
        let a = ak.object_attributes();
        assert!(a.restricted() && a.sign_encrypt() && a.fixed_tpm() && !a.decrypt());
    }
}
