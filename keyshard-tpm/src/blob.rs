//! The sealed blob: a TPM sealed-data object (public and private area) together with the PCR
//! selection its policy names, in a byte format that can be stored and parsed strictly.
//!
//! Format (integers big-endian), as written by [`SealedBlob::to_bytes`]:
//!
//! ```text
//! offset  size   field
//! 0       4      magic "KSSB"
//! 4       1      version = 1
//! 5       2      PCR bank: TPM_ALG_ID (0x0004 sha1, 0x000b sha256, 0x000c sha384)
//! 7       1      n: number of PCRs, 1..=24
//! 8       n      PCR indices, ascending, each 0..=23
//! 8+n     2+P    TPM2B_PUBLIC: u16 P, then the marshalled TPMT_PUBLIC (tpm2-tools' .pub)
//! ...     2+R    TPM2B_PRIVATE: u16 R, then the private area (tpm2-tools' .priv)
//! ```
//! Nothing may follow. The public area must describe a sealed-data object as [`crate::Tpm`]
//! makes them: keyed-hash with a null scheme, SHA-256 name, fixedTPM and fixedParent,
//! userWithAuth clear (only a policy session unseals it) and a 32-byte authPolicy.
//! The private area is encrypted to the storage root key; only that TPM can load it.

use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::structures::{KeyedHashScheme, Private, Public, PublicKeyedHashParameters};
use tss_esapi::traits::{Marshall, UnMarshall};

use keyshard_attest::tpm::pcr::{PcrError, PcrSelection};
use keyshard_attest::tpm::wire::{self, Reader, WireError};

const MAGIC: [u8; 4] = *b"KSSB";
const VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    #[error("not a keyshard sealed blob (bad magic)")]
    Magic,
    #[error("sealed blob version {0} is not supported")]
    Version(u8),
    #[error("sealed blob: {0}")]
    Wire(#[from] WireError),
    #[error("sealed blob: PCR selection: {0}")]
    Selection(#[from] PcrError),
    #[error("sealed blob: the public area is not a TPMT_PUBLIC")]
    Public,
    #[error("sealed blob: the public area is not a PCR-sealed data object: {0}")]
    NotSealedData(&'static str),
    #[error("sealed blob: the private area ({0} bytes) is too large")]
    Private(usize),
}

pub type Result<T> = std::result::Result<T, BlobError>;

/// A secret sealed by a TPM under PolicyPCR. Holds no secret in clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedBlob {
    selection: PcrSelection,
    public: Vec<u8>,
    private: Vec<u8>,
}

impl SealedBlob {
    /// From a TPM's Create output.
    pub(crate) fn from_tpm(
        selection: PcrSelection,
        public: &Public,
        private: &Private,
    ) -> Result<Self> {
        let public = public.marshall().map_err(|_| BlobError::Public)?;
        let blob = Self {
            selection,
            public,
            private: private.value().to_vec(),
        };
        blob.tpm_parts()?;
        Ok(blob)
    }

    /// The PCRs the policy names; unseal satisfies PolicyPCR over these.
    pub fn selection(&self) -> &PcrSelection {
        &self.selection
    }

    /// The format described at the top of this module.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.public.len() + self.private.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        self.selection.write(&mut out);
        // Both areas were checked against TPM size limits (far below 64 KiB) on the way in.
        let _ = wire::put_sized(&mut out, &self.public);
        let _ = wire::put_sized(&mut out, &self.private);
        out
    }

    /// Parses and checks a blob: structure, selection, and that the public area describes a
    /// policy-only sealed-data object.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        if r.array::<4>("magic")? != MAGIC {
            return Err(BlobError::Magic);
        }
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(BlobError::Version(version));
        }
        let selection = PcrSelection::read(&mut r).map_err(|e| match e {
            PcrError::Wire(w) => BlobError::Wire(w),
            other => BlobError::Selection(other),
        })?;
        let public = r.sized("TPM2B_PUBLIC")?.to_vec();
        let private = r.sized("TPM2B_PRIVATE")?.to_vec();
        r.finish()?;
        let blob = Self {
            selection,
            public,
            private,
        };
        blob.tpm_parts()?;
        Ok(blob)
    }

    /// The public and private areas as tss-esapi structures, checked.
    pub(crate) fn tpm_parts(&self) -> Result<(Public, Private)> {
        let public = Public::unmarshall(&self.public).map_err(|_| BlobError::Public)?;
        // Unmarshalling ignores bytes after the structure: require the canonical encoding.
        if public.marshall().ok().as_deref() != Some(self.public.as_slice()) {
            return Err(BlobError::Public);
        }
        check_sealed_data(&public)?;
        let private = Private::try_from(self.private.clone())
            .map_err(|_| BlobError::Private(self.private.len()))?;
        if self.private.is_empty() {
            return Err(BlobError::Private(0));
        }
        Ok((public, private))
    }
}

fn check_sealed_data(public: &Public) -> Result<()> {
    let Public::KeyedHash {
        object_attributes: a,
        name_hashing_algorithm,
        auth_policy,
        parameters,
        ..
    } = public
    else {
        return Err(BlobError::NotSealedData("not a keyed-hash object"));
    };
    if *parameters != PublicKeyedHashParameters::new(KeyedHashScheme::Null) {
        return Err(BlobError::NotSealedData(
            "an HMAC or XOR key, not sealed data",
        ));
    }
    if *name_hashing_algorithm != HashingAlgorithm::Sha256 {
        return Err(BlobError::NotSealedData("name algorithm is not SHA-256"));
    }
    if a.user_with_auth() {
        return Err(BlobError::NotSealedData(
            "userWithAuth is set: a password would unseal it",
        ));
    }
    if !(a.fixed_tpm() && a.fixed_parent()) {
        return Err(BlobError::NotSealedData(
            "not fixedTPM and fixedParent: it could be duplicated",
        ));
    }
    if a.sign_encrypt() || a.decrypt() || a.restricted() || a.sensitive_data_origin() {
        return Err(BlobError::NotSealedData("key attributes on a data object"));
    }
    if auth_policy.value().len() != 32 {
        return Err(BlobError::NotSealedData("no SHA-256 authPolicy"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use keyshard_core::policy::PcrBank;
    use tss_esapi::attributes::ObjectAttributesBuilder;
    use tss_esapi::interface_types::algorithm::PublicAlgorithm;
    use tss_esapi::structures::{Digest, PublicBuilder};

    use super::*;

    fn public(user_with_auth: bool, scheme: KeyedHashScheme) -> Public {
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_no_da(true)
            .with_user_with_auth(user_with_auth)
            .with_admin_with_policy(true)
            .build()
            .unwrap();
        PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_auth_policy(Digest::try_from(vec![0x11; 32]).unwrap())
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(scheme))
            .with_keyed_hash_unique_identifier(Digest::try_from(vec![0x22; 32]).unwrap())
            .build()
            .unwrap()
    }

    fn blob() -> SealedBlob {
        SealedBlob::from_tpm(
            PcrSelection::new(PcrBank::Sha256, &[0, 7]).unwrap(),
            &public(false, KeyedHashScheme::Null),
            &Private::try_from(vec![0x33; 160]).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn round_trips_with_the_documented_layout() {
        let b = blob();
        let bytes = b.to_bytes();
        assert_eq!(&bytes[..10], b"KSSB\x01\x00\x0b\x02\x00\x07");
        let public_len = usize::from(u16::from_be_bytes([bytes[10], bytes[11]]));
        assert_eq!(public_len, b.public.len());
        assert_eq!(bytes.len(), 10 + 2 + public_len + 2 + 160);
        assert_eq!(SealedBlob::parse(&bytes).unwrap(), b);
        assert_eq!(b.selection().to_string(), "sha256:0,7");
    }

    #[test]
    fn refuses_truncated_or_extended_blobs() {
        let bytes = blob().to_bytes();
        for cut in 0..bytes.len() {
            assert!(
                SealedBlob::parse(&bytes[..cut]).is_err(),
                "a blob cut at {cut} bytes parsed"
            );
        }
        let mut long = bytes;
        long.push(0);
        assert!(matches!(
            SealedBlob::parse(&long),
            Err(BlobError::Wire(WireError::Trailing { extra: 1, .. }))
        ));
    }

    #[test]
    fn refuses_tampered_headers_and_selections() {
        let bytes = blob().to_bytes();
        let mut bad = bytes.clone();
        bad[1] = b'x';
        assert_eq!(SealedBlob::parse(&bad), Err(BlobError::Magic));
        let mut bad = bytes.clone();
        bad[4] = 9;
        assert_eq!(SealedBlob::parse(&bad), Err(BlobError::Version(9)));
        let mut bad = bytes.clone();
        bad[6] = 0x0d;
        assert_eq!(
            SealedBlob::parse(&bad),
            Err(BlobError::Selection(PcrError::UnknownBank(0x0d)))
        );
        let mut bad = bytes.clone();
        bad[9] = 0;
        assert_eq!(
            SealedBlob::parse(&bad),
            Err(BlobError::Selection(PcrError::NotAscending { index: 0 }))
        );
        let mut bad = bytes;
        bad[9] = 24;
        assert_eq!(
            SealedBlob::parse(&bad),
            Err(BlobError::Selection(PcrError::OutOfRange { index: 24 }))
        );
    }

    #[test]
    fn refuses_public_areas_that_are_not_policy_sealed_data() {
        let bytes = blob().to_bytes();
        // the public area's first byte (the type's high byte) changed: not a TPMT_PUBLIC
        let mut bad = bytes.clone();
        bad[12] = 0x77;
        assert_eq!(SealedBlob::parse(&bad), Err(BlobError::Public));

        let sel = PcrSelection::new(PcrBank::Sha256, &[7]).unwrap();
        let private = Private::try_from(vec![1; 16]).unwrap();
        assert!(matches!(
            SealedBlob::from_tpm(sel.clone(), &public(true, KeyedHashScheme::Null), &private),
            Err(BlobError::NotSealedData(reason)) if reason.contains("userWithAuth")
        ));
        assert!(matches!(
            SealedBlob::from_tpm(
                sel.clone(),
                &public(false, KeyedHashScheme::HMAC_SHA_256),
                &private
            ),
            Err(BlobError::NotSealedData(_))
        ));
        assert_eq!(
            SealedBlob::from_tpm(
                sel,
                &public(false, KeyedHashScheme::Null),
                &Private::default()
            ),
            Err(BlobError::Private(0))
        );
    }
}
