//! ARK -> ASK -> VCEK: three RSA-PSS SHA-384 signature checks through the `sev` crate against
//! the pinned anchors of the VCEK's product, each a step that returns the next signer. Each
//! certificate's unsigned parts must be well formed too: signatureAlgorithm equal to the signed
//! one in its TBS (RFC 5280 4.1.1.2), and a signature BIT STRING of whole bytes. The `sev` crate
//! reads only the outer OID and the signature's raw bytes, and would accept changes to either.

use sev::certs::snp::{Certificate, Verifiable};

use super::anchors::AnchorPair;
use super::product::Product;
use super::vcek::Vcek;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("the {which}'s signatureAlgorithm differs from the one it signed")]
    AlgorithmMismatch { which: &'static str },
    #[error("the {which}'s signature BIT STRING has unused bits")]
    SignatureBits { which: &'static str },
    #[error("the pinned {product} ARK is not self-signed (ARK and ASK swapped?): {reason}")]
    ArkSelfSignature { product: Product, reason: String },
    #[error("the pinned {product} ASK is not signed by the pinned ARK: {reason}")]
    AskSignature { product: Product, reason: String },
    #[error("the VCEK is not signed by AMD's {product} ASK (foreign or forged chain): {reason}")]
    VcekSignature { product: Product, reason: String },
}

pub type Result<T> = std::result::Result<T, ChainError>;

/// The parts outside the signature: signatureAlgorithm == tbsCertificate.signature (which is
/// inside it), and the signature a whole number of bytes.
fn unsigned_parts(cert: &x509_cert::Certificate, which: &'static str) -> Result<()> {
    if cert.signature_algorithm != cert.tbs_certificate.signature {
        return Err(ChainError::AlgorithmMismatch { which });
    }
    if cert.signature.as_bytes().is_none() {
        return Err(ChainError::SignatureBits { which });
    }
    Ok(())
}

/// The ARK signs itself; returns it as the ASK's signer.
pub fn trusted_ark(anchors: &AnchorPair, product: Product) -> Result<&Certificate> {
    unsigned_parts(&anchors.ark.clone().into(), "ARK")?;
    (&anchors.ark, &anchors.ark)
        .verify()
        .map_err(|e| ChainError::ArkSelfSignature {
            product,
            reason: e.to_string(),
        })?;
    Ok(&anchors.ark)
}

/// The ARK signs the ASK; returns the ASK as the VCEK's signer.
pub fn trusted_ask<'a>(
    ark: &Certificate,
    anchors: &'a AnchorPair,
    product: Product,
) -> Result<&'a Certificate> {
    unsigned_parts(&anchors.ask.clone().into(), "ASK")?;
    (ark, &anchors.ask)
        .verify()
        .map_err(|e| ChainError::AskSignature {
            product,
            reason: e.to_string(),
        })?;
    Ok(&anchors.ask)
}

/// The ASK signs the VCEK.
pub fn trusted_vcek(ask: &Certificate, vcek: &Vcek) -> Result<()> {
    unsigned_parts(vcek.certificate(), "VCEK")?;
    (ask, &vcek.to_sev())
        .verify()
        .map_err(|e| ChainError::VcekSignature {
            product: vcek.product(),
            reason: e.to_string(),
        })
}

/// The whole chain, from the pinned ARK down to the VCEK.
pub fn verify_chain(anchors: &AnchorPair, vcek: &Vcek) -> Result<()> {
    let product = vcek.product();
    let ark = trusted_ark(anchors, product)?;
    let ask = trusted_ask(ark, anchors, product)?;
    trusted_vcek(ask, vcek)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snp::anchors::TrustAnchors;
    use crate::snp::fixtures::MILAN_VCEK_DER;

    #[test]
    fn real_milan_vcek_chains_to_amd_milan_roots_only() {
        let anchors = TrustAnchors::amd().unwrap();
        let vcek = Vcek::from_der(MILAN_VCEK_DER).unwrap();
        verify_chain(anchors.get(Product::Milan).unwrap(), &vcek).unwrap();
        for other in [Product::Genoa, Product::Turin] {
            assert!(matches!(
                verify_chain(anchors.get(other).unwrap(), &vcek),
                Err(ChainError::VcekSignature { .. })
            ));
        }
    }

    #[test]
    fn unsigned_parts_of_the_vcek_must_match_what_was_signed() {
        let anchors = TrustAnchors::amd().unwrap();
        let milan = anchors.get(Product::Milan).unwrap();
        // Offsets in the real VCEK: 837 is saltLength in the outer signatureAlgorithm (48 -> 49),
        // 847 the signature BIT STRING's unused-bits count (0 -> 1).
        let mut der = MILAN_VCEK_DER.to_vec();
        assert_eq!(der[837], 0x30);
        der[837] ^= 0x01;
        let vcek = Vcek::from_der(&der).unwrap();
        assert_eq!(
            verify_chain(milan, &vcek),
            Err(ChainError::AlgorithmMismatch { which: "VCEK" })
        );
        let mut der = MILAN_VCEK_DER.to_vec();
        assert_eq!(der[847], 0x00);
        der[847] ^= 0x01;
        let vcek = Vcek::from_der(&der).unwrap();
        assert_eq!(
            verify_chain(milan, &vcek),
            Err(ChainError::SignatureBits { which: "VCEK" })
        );
    }

    #[test]
    fn swapped_ark_and_ask_are_refused() {
        let amd = TrustAnchors::amd().unwrap();
        let milan = amd.get(Product::Milan).unwrap();
        let swapped = AnchorPair {
            ark: milan.ask.clone(),
            ask: milan.ark.clone(),
        };
        let vcek = Vcek::from_der(MILAN_VCEK_DER).unwrap();
        assert!(matches!(
            verify_chain(&swapped, &vcek),
            Err(ChainError::ArkSelfSignature { .. })
        ));
        // An ASK from another product under the Milan ARK.
        let mixed = AnchorPair {
            ark: milan.ark.clone(),
            ask: amd.get(Product::Genoa).unwrap().ask.clone(),
        };
        assert!(matches!(
            verify_chain(&mixed, &vcek),
            Err(ChainError::AskSignature { .. })
        ));
    }
}
