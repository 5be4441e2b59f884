//! Fragments: one share with everything a combiner needs to trust and use it, signed by the
//! dealer. [`Fragment`] is parsed but not yet trusted; [`VerifiedFragment`] passed the dealer's
//! signature check (or was just signed by the dealer). The byte layout is in [`wire`].

pub mod wire;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::holder::{HolderClass, HolderId, KeyId, NameError};
use crate::kcv::KeyCheckValue;
use crate::sharing::{Share, SharingError, Threshold};

pub use wire::{DEAL_ID_LEN, MAGIC, MAX_FRAGMENT_LEN, SIGNATURE_LEN, VERSION};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FragmentError {
    #[error("fragment is {len} bytes, larger than any valid fragment ({max})")]
    TooLarge { len: usize, max: usize },
    #[error("fragment is truncated: {field} is missing or short")]
    Truncated { field: &'static str },
    #[error("not a keyshard fragment (bad magic)")]
    BadMagic,
    #[error(
        "fragment format version 1 is from before deal ids and is no longer read: re-deal the \
         secret (keyshard split or keyshard init) to make version {VERSION} fragments"
    )]
    VersionWithoutDealId,
    #[error("unsupported fragment version {version} (this build reads version {VERSION})")]
    UnsupportedVersion { version: u8 },
    #[error("unknown holder class code {code}")]
    UnknownHolderClass { code: u8 },
    #[error("invalid k/n: {0}")]
    BadThreshold(SharingError),
    #[error("share index {index} is outside 1..={n}")]
    BadShareIndex { index: u8, n: u8 },
    #[error("invalid key id: {0}")]
    BadKeyId(NameError),
    #[error("invalid holder id: {0}")]
    BadHolderId(NameError),
    #[error("share length {len} is outside 1..={max}", max = crate::sharing::MAX_SECRET_LEN)]
    BadShareLength { len: usize },
    #[error("{extra} unexpected bytes after the signature")]
    TrailingBytes { extra: usize },
    #[error("dealer signature does not verify (tampered, or signed by another dealer)")]
    BadSignature,
}

pub type Result<T> = std::result::Result<T, FragmentError>;

impl From<crate::bytes::Truncated> for FragmentError {
    fn from(t: crate::bytes::Truncated) -> Self {
        Self::Truncated { field: t.field }
    }
}

/// Names one deal: drawn at random once per split, carried by each of its fragments, so that
/// fragments of two splits with the same key id and epoch are never combined together.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DealId([u8; DEAL_ID_LEN]);

impl DealId {
    /// A fresh deal id from the operating system's randomness.
    pub fn random() -> std::result::Result<Self, getrandom::Error> {
        let mut bytes = [0u8; DEAL_ID_LEN];
        getrandom::fill(&mut bytes)?;
        Ok(Self(bytes))
    }

    pub const fn from_bytes(bytes: [u8; DEAL_ID_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; DEAL_ID_LEN] {
        &self.0
    }
}

/// 32 hex digits.
impl std::fmt::Display for DealId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for DealId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DealId({self})")
    }
}

/// Everything in a fragment but the share bytes and the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FragmentHeader {
    pub key_id: KeyId,
    pub epoch: u64,
    /// Which split of the secret this fragment belongs to.
    pub deal: DealId,
    /// The share's x coordinate, 1..=n.
    pub index: u8,
    pub threshold: Threshold,
    pub class: HolderClass,
    pub holder_id: HolderId,
    pub kcv: KeyCheckValue,
}

/// A parsed fragment whose signature has not been checked: look, but do not combine.
pub struct Fragment {
    header: FragmentHeader,
    share: Zeroizing<Vec<u8>>,
    encoded: Zeroizing<Vec<u8>>,
    signed_len: usize,
    signature: [u8; wire::SIGNATURE_LEN],
}

/// Whether the file at `path` is a keyshard fragment (of this format, or a version 1 one): the
/// test for what keyshard may remove as its own stale fragment file, and nothing else.
pub fn is_fragment_file(path: &std::path::Path) -> bool {
    crate::files::read_limited(path, MAX_FRAGMENT_LEN).is_ok_and(|bytes| {
        matches!(
            Fragment::parse(&bytes),
            Ok(_) | Err(FragmentError::VersionWithoutDealId)
        )
    })
}

impl Fragment {
    /// Parses `bytes` strictly: bounded lengths, known version and class, nothing trailing.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let parsed = wire::parse(bytes)?;
        Ok(Self {
            header: parsed.header,
            share: parsed.share,
            encoded: Zeroizing::new(bytes.to_vec()),
            signed_len: parsed.signed_len,
            signature: parsed.signature,
        })
    }

    pub fn header(&self) -> &FragmentHeader {
        &self.header
    }

    pub fn share_len(&self) -> usize {
        self.share.len()
    }

    /// Checks the dealer's Ed25519 signature (strict: no malleable or small-order forms).
    pub fn verify(self, dealer: &VerifyingKey) -> Result<VerifiedFragment> {
        let signed = self
            .encoded
            .get(..self.signed_len)
            .ok_or(FragmentError::Truncated { field: "signature" })?;
        dealer
            .verify_strict(signed, &Signature::from_bytes(&self.signature))
            .map_err(|_| FragmentError::BadSignature)?;
        Ok(VerifiedFragment {
            share: Share::new(self.header.index, self.share),
            header: self.header,
            encoded: self.encoded,
        })
    }
}

impl std::fmt::Debug for Fragment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fragment")
            .field("header", &self.header)
            .field("share_len", &self.share.len())
            .finish_non_exhaustive()
    }
}

/// A fragment the dealer is known to have signed.
pub struct VerifiedFragment {
    header: FragmentHeader,
    share: Share,
    encoded: Zeroizing<Vec<u8>>,
}

impl VerifiedFragment {
    /// Signs `share` with `header` as the dealer. `header.index` names the share's x.
    pub fn sign(header: FragmentHeader, share: &Share, dealer: &SigningKey) -> Result<Self> {
        if share.index() != header.index || header.index == 0 || header.index > header.threshold.n()
        {
            return Err(FragmentError::BadShareIndex {
                index: share.index(),
                n: header.threshold.n(),
            });
        }
        let mut encoded = wire::encode_signed_part(&header, share.value())?;
        let signature = dealer.sign(&encoded);
        encoded.extend_from_slice(&signature.to_bytes());
        Ok(Self {
            header,
            share: share.clone(),
            encoded,
        })
    }

    pub fn header(&self) -> &FragmentHeader {
        &self.header
    }

    pub fn share(&self) -> &Share {
        &self.share
    }

    /// The fragment's bytes, as written to a fragment file or device.
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    /// The dealer's signature: the last [`wire::SIGNATURE_LEN`] bytes.
    pub fn signature(&self) -> Option<[u8; wire::SIGNATURE_LEN]> {
        self.encoded
            .len()
            .checked_sub(wire::SIGNATURE_LEN)
            .and_then(|at| self.encoded.get(at..))
            .and_then(|tail| tail.try_into().ok())
    }
}

/// A fragment's bytes from its parts, as the dealer signed them: for a fragment carried in
/// another form (a recovery code). The result is not trusted until it is parsed and verified.
pub fn assemble(
    header: &FragmentHeader,
    share: &[u8],
    signature: &[u8; wire::SIGNATURE_LEN],
) -> Result<Zeroizing<Vec<u8>>> {
    let mut encoded = wire::encode_signed_part(header, share)?;
    encoded.extend_from_slice(signature);
    Ok(encoded)
}

impl std::fmt::Debug for VerifiedFragment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedFragment")
            .field("header", &self.header)
            .field("share", &self.share)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
