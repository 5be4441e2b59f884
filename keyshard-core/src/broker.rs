//! The broker mailbox protocol: how a guest asks the host coordinator for attested shares over
//! a virtio-blk device (serial `ksb-<vm-id>`).
//!
//! The device has two areas. The guest writes one request, whole, at offset 0 of the request
//! area; it then reads the answer area until the answer names its request id. Reads never change
//! anything. Every message, in both directions, is one header and one body, little-endian:
//!
//! | offset | size | field                                         |
//! |--------|------|-----------------------------------------------|
//! | 0      | 4    | magic `KSBM`                                  |
//! | 4      | 1    | version, 1                                    |
//! | 5      | 1    | kind (below)                                  |
//! | 6      | 2    | reserved, 0                                   |
//! | 8      | 8    | request id, chosen at random by the guest     |
//! | 16     | 4    | body length, at most [`MAX_BODY_LEN`]         |
//! | 20     | ...  | body                                          |
//!
//! Kinds and bodies:
//! - `0x01` nonce request (guest): empty. Asks for a fresh coordinator nonce, for SEV-SNP.
//! - `0x02` release request (guest): holder class (1), holder id (1 + 1..=16), the request's
//!   X25519 public key (32), evidence tag (1: 0 none, 1 SEV-SNP, 2 guest nonce); for SEV-SNP:
//!   the nonce (32), the attestation report (2 + 1..=4000) and the VCEK in DER (2 + 0..=4096; 0:
//!   use the cache); for a guest nonce (a `tpm` release whose host quote the guest checks): the
//!   guest's own random nonce (32); for the VM's TPM (tag 3, a `host` release): nothing, the
//!   coordinator quotes the VM's TPM over each nonce the CMS and the shard host ask, with the
//!   request key bound in the qualifying data, and relays ([`crate::host_class`]).
//! - `0x81` nonce (coordinator): the nonce (32), how long it stays valid in milliseconds (4).
//! - `0x82` pending (coordinator): empty; the request is being worked on.
//! - `0x83` released (coordinator): holder class (1), holder id (1 + ...), the HPKE
//!   encapsulated key (32), ciphertext (2 + ...): the signed fragment, sealed to the request key.
//!   Then, only for a release that carried a guest nonce, the host quote: tag 1 (1), the
//!   TPMS_ATTEST bytes (2 + 1..=[`MAX_ATTEST_LEN`]), the ECDSA P-256 signature r || s (64), and
//!   the request's inclusion path ([`merkle`]): a count (1, at most [`merkle::MAX_PATH_LEN`]),
//!   then per step the side (1: 0 sibling on the right, 1 on the left) and the sibling (32).
//!   The quote's qualifying data is the Merkle root over the nonces it answers.
//! - `0x84` host share released (coordinator, for a `host` release): holder id (1 + 1..=16),
//!   the release binding the shard host sealed under: credential (1 + 1..=64, a key id), epoch
//!   (8), share index (1, 1..=255), shard host id (1 + 1..=64, key id characters); then the
//!   shard host's released shard as it sent it (2 + 1..=[`shard_release::MAX_RELEASED_LEN`],
//!   `KSRS`, HPKE-sealed by the shard host to the request key; [`crate::shard_release`]).
//! - `0xFF` refused (coordinator): a code (2) and a reason (2 + 0..=512 bytes of UTF-8).
//!
//! Refusal codes ([`RefusalCode`]); an unknown code is kept as a number:
//!
//! | code | name                 | meaning                                                      |
//! |------|----------------------|--------------------------------------------------------------|
//! | 1    | `Malformed`          | the request does not parse                                   |
//! | 2    | `UnsupportedVersion` | an unknown protocol version                                  |
//! | 3    | `TooLarge`           | a length beyond the format's limits                          |
//! | 4    | `UnknownKind`        | not a request kind a guest may write                         |
//! | 5    | `UnknownHolder`      | no such holder here, or not of that class                    |
//! | 6    | `HostAttestation`    | the host's own quote did not verify (a PCR changed)          |
//! | 7    | `SnpEvidence`        | the SEV-SNP report or its chain did not verify               |
//! | 8    | `SnpPolicy`          | the report verified but the SEV-SNP policy refuses it        |
//! | 9    | `Nonce`              | the nonce is unknown, spent, expired or another VM's         |
//! | 10   | `Internal`           | the coordinator could not answer (a part failed to load)     |
//! | 11   | `RateLimited`        | this VM asks too often: wait and ask again (not a verdict)   |
//! | 12   | `VmNotBound`         | the key's shares are not bound to this VM (`init --vm-id`)   |
//! | 13   | `HostShare`          | the CMS or the shard host refused, failed or did not answer  |
//! |      |                      | in time; the reason names which                              |

mod binding;
pub mod merkle;

pub use binding::{REPORT_DATA_LEN, report_data_binding};

use crate::bytes::{Reader, Truncated};
use crate::envelope::{ENCAPPED_KEY_LEN, Envelope, PUBLIC_KEY_LEN};
use crate::fragment::MAX_FRAGMENT_LEN;
use crate::holder::{HolderClass, HolderId, KeyId};
use crate::shard_release;

pub const MAGIC: [u8; 4] = *b"KSBM";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 20;
/// The request area and the answer area each hold one message of at most this size.
pub const AREA_LEN: usize = 16 * 1024;
pub const MAX_BODY_LEN: usize = AREA_LEN - HEADER_LEN;
pub const NONCE_LEN: usize = 32;
pub const MAX_REPORT_LEN: usize = 4000;
/// Largest VCEK a request carries, and the largest the host's verifier accepts from anywhere
/// (AMD's VCEKs are about 1.4 KB).
pub const MAX_VCEK_LEN: usize = 4096;
pub const MAX_REASON_LEN: usize = 512;
/// Largest TPMS_ATTEST a host quote carries (a quote over one bank is about 150 bytes).
pub const MAX_ATTEST_LEN: usize = 1024;
/// Bytes of an ECDSA P-256 signature, r || s.
pub const QUOTE_SIGNATURE_LEN: usize = 64;
/// The broker device's serial prefix; the guest looks for it.
pub const SERIAL_PREFIX: &str = "ksb-";

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("message truncated: {field} is missing or short")]
    Truncated { field: &'static str },
    #[error("not a broker message (bad magic)")]
    BadMagic,
    #[error("unsupported broker protocol version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("body of {len} bytes is larger than {MAX_BODY_LEN}")]
    TooLarge { len: usize },
    #[error("{0} bytes follow the declared body")]
    TrailingBytes(usize),
    #[error("unknown holder class code {0}")]
    UnknownClass(u8),
    #[error("invalid holder id: {0}")]
    HolderId(String),
    #[error("{field} is {len} bytes, outside {min}..={max}")]
    FieldLength {
        field: &'static str,
        len: usize,
        min: usize,
        max: usize,
    },
    #[error("unknown evidence tag {0}")]
    UnknownEvidence(u8),
    #[error("unknown host quote tag {0}")]
    UnknownQuote(u8),
    #[error("inclusion path side {0} is neither 0 nor 1")]
    PathSide(u8),
    #[error("reason is not UTF-8")]
    ReasonEncoding,
    #[error("invalid name: {0}")]
    Name(String),
    #[error("share index 0: indexes start at 1")]
    ZeroIndex,
}

impl From<Truncated> for MessageError {
    fn from(t: Truncated) -> Self {
        Self::Truncated { field: t.field }
    }
}

pub type Result<T> = std::result::Result<T, MessageError>;

/// What the guest offers as proof for a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evidence {
    /// `tpm` shares: the coordinator attests the host itself.
    None,
    /// `sev` shares: an SNP report whose REPORT_DATA is SHA-512(nonce || request key).
    Snp {
        nonce: [u8; NONCE_LEN],
        report: Vec<u8>,
        /// Empty: the coordinator looks the VCEK up in its cache.
        vcek: Vec<u8>,
    },
    /// `tpm` shares checked by the guest: the guest's own nonce, which the host quote in the
    /// answer must include (through the Merkle root it quotes).
    TpmNonce { nonce: [u8; NONCE_LEN] },
    /// `host` shares: the coordinator quotes the VM's TPM for the request key, over the nonces
    /// of the CMS and the shard host.
    VmTpm,
}

/// The host's quote as a `tpm` release answer carries it: what the guest checks against the AK
/// and golden PCR digest of its manifest, and its nonce's path to the quoted root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostQuote {
    /// The marshalled TPMS_ATTEST, exactly the signed bytes.
    pub attest: Vec<u8>,
    pub signature: [u8; QUOTE_SIGNATURE_LEN],
    pub path: Vec<merkle::PathStep>,
}

/// Why the coordinator refused; the code lets a guest tell failures apart without parsing text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCode {
    Malformed,
    UnsupportedVersion,
    TooLarge,
    UnknownKind,
    UnknownHolder,
    HostAttestation,
    SnpEvidence,
    SnpPolicy,
    Nonce,
    Internal,
    RateLimited,
    VmNotBound,
    HostShare,
    Other(u16),
}

impl RefusalCode {
    pub fn to_u16(self) -> u16 {
        match self {
            Self::Malformed => 1,
            Self::UnsupportedVersion => 2,
            Self::TooLarge => 3,
            Self::UnknownKind => 4,
            Self::UnknownHolder => 5,
            Self::HostAttestation => 6,
            Self::SnpEvidence => 7,
            Self::SnpPolicy => 8,
            Self::Nonce => 9,
            Self::Internal => 10,
            Self::RateLimited => 11,
            Self::VmNotBound => 12,
            Self::HostShare => 13,
            Self::Other(code) => code,
        }
    }

    pub fn from_u16(code: u16) -> Self {
        match code {
            1 => Self::Malformed,
            2 => Self::UnsupportedVersion,
            3 => Self::TooLarge,
            4 => Self::UnknownKind,
            5 => Self::UnknownHolder,
            6 => Self::HostAttestation,
            7 => Self::SnpEvidence,
            8 => Self::SnpPolicy,
            9 => Self::Nonce,
            10 => Self::Internal,
            11 => Self::RateLimited,
            12 => Self::VmNotBound,
            13 => Self::HostShare,
            other => Self::Other(other),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    NonceRequest,
    Release {
        class: HolderClass,
        holder_id: HolderId,
        request_key: [u8; PUBLIC_KEY_LEN],
        evidence: Evidence,
    },
    Nonce {
        nonce: [u8; NONCE_LEN],
        valid_for_ms: u32,
    },
    Pending,
    Released {
        class: HolderClass,
        holder_id: HolderId,
        envelope: Envelope,
        /// The host quote, for a release that carried a guest nonce.
        host_quote: Option<HostQuote>,
    },
    /// A `host` share as its shard host released it, sealed to the request key.
    HostReleased {
        holder_id: HolderId,
        /// The binding the shard host sealed under (not trusted by the guest: a wrong one only
        /// keeps the shard from opening).
        credential: KeyId,
        epoch: u64,
        index: u8,
        host: String,
        /// The `KSRS` bytes.
        released: Vec<u8>,
    },
    Refused {
        code: RefusalCode,
        reason: String,
    },
}

impl Body {
    fn kind(&self) -> u8 {
        match self {
            Self::NonceRequest => 0x01,
            Self::Release { .. } => 0x02,
            Self::Nonce { .. } => 0x81,
            Self::Pending => 0x82,
            Self::Released { .. } => 0x83,
            Self::HostReleased { .. } => 0x84,
            Self::Refused { .. } => 0xFF,
        }
    }

    /// Whether the guest sends this kind (the coordinator sends the others).
    pub fn is_request(&self) -> bool {
        matches!(self, Self::NonceRequest | Self::Release { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub request_id: u64,
    pub body: Body,
}

/// Encoding never fails for values the parser would accept; out-of-range lengths are cut to
/// what the format allows (a reason) or reported (everything else).
impl Message {
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        match &self.body {
            Body::NonceRequest | Body::Pending => {}
            Body::Release {
                class,
                holder_id,
                request_key,
                evidence,
            } => {
                body.push(class.code());
                put_short_str(&mut body, holder_id.as_str());
                body.extend_from_slice(request_key);
                match evidence {
                    Evidence::None => body.push(0),
                    Evidence::Snp {
                        nonce,
                        report,
                        vcek,
                    } => {
                        body.push(1);
                        body.extend_from_slice(nonce);
                        put_bytes(&mut body, "report", report, 1, MAX_REPORT_LEN)?;
                        put_bytes(&mut body, "vcek", vcek, 0, MAX_VCEK_LEN)?;
                    }
                    Evidence::TpmNonce { nonce } => {
                        body.push(2);
                        body.extend_from_slice(nonce);
                    }
                    Evidence::VmTpm => body.push(3),
                }
            }
            Body::Nonce {
                nonce,
                valid_for_ms,
            } => {
                body.extend_from_slice(nonce);
                body.extend_from_slice(&valid_for_ms.to_le_bytes());
            }
            Body::Released {
                class,
                holder_id,
                envelope,
                host_quote,
            } => {
                body.push(class.code());
                put_short_str(&mut body, holder_id.as_str());
                body.extend_from_slice(&envelope.encapped_key);
                put_bytes(
                    &mut body,
                    "ciphertext",
                    &envelope.ciphertext,
                    1,
                    MAX_CIPHERTEXT_LEN,
                )?;
                if let Some(quote) = host_quote {
                    put_host_quote(&mut body, quote)?;
                }
            }
            Body::HostReleased {
                holder_id,
                credential,
                epoch,
                index,
                host,
                released,
            } => {
                put_short_str(&mut body, holder_id.as_str());
                put_short_str(&mut body, credential.as_str());
                body.extend_from_slice(&epoch.to_le_bytes());
                body.push(check_index(*index)?);
                check_host_id(host)?;
                put_short_str(&mut body, host);
                put_bytes(
                    &mut body,
                    "released shard",
                    released,
                    1,
                    shard_release::MAX_RELEASED_LEN,
                )?;
            }
            Body::Refused { code, reason } => {
                body.extend_from_slice(&code.to_u16().to_le_bytes());
                let reason = truncate_utf8(reason, MAX_REASON_LEN);
                put_bytes(&mut body, "reason", reason.as_bytes(), 0, MAX_REASON_LEN)?;
            }
        }
        if body.len() > MAX_BODY_LEN {
            return Err(MessageError::TooLarge { len: body.len() });
        }
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.body.kind());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.request_id.to_le_bytes());
        // Bounded by MAX_BODY_LEN above.
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Parses one message. Bytes after the declared body must be zero (the padding of a sector
    /// write); anything else is refused.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        if r.array::<4>("magic")? != MAGIC {
            return Err(MessageError::BadMagic);
        }
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(MessageError::UnsupportedVersion(version));
        }
        let kind = r.u8("kind")?;
        if r.array::<2>("reserved")? != [0, 0] {
            return Err(MessageError::Reserved);
        }
        let request_id = r.u64("request id")?;
        let body_len = usize::try_from(r.u32("body length")?).unwrap_or(usize::MAX);
        if body_len > MAX_BODY_LEN {
            return Err(MessageError::TooLarge { len: body_len });
        }
        let body_bytes = r.take(body_len, "body")?;
        let padding = bytes.get(r.position()..).unwrap_or_default();
        if padding.iter().any(|b| *b != 0) {
            return Err(MessageError::TrailingBytes(padding.len()));
        }
        let mut b = Reader::new(body_bytes);
        let body = match kind {
            0x01 => Body::NonceRequest,
            0x02 => {
                let class = class(&mut b)?;
                let holder_id = holder_id(&mut b)?;
                let request_key = b.array("request key")?;
                let evidence = match b.u8("evidence tag")? {
                    0 => Evidence::None,
                    1 => Evidence::Snp {
                        nonce: b.array("nonce")?,
                        report: get_bytes(&mut b, "report", 1, MAX_REPORT_LEN)?,
                        vcek: get_bytes(&mut b, "vcek", 0, MAX_VCEK_LEN)?,
                    },
                    2 => Evidence::TpmNonce {
                        nonce: b.array("guest nonce")?,
                    },
                    3 => Evidence::VmTpm,
                    tag => return Err(MessageError::UnknownEvidence(tag)),
                };
                Body::Release {
                    class,
                    holder_id,
                    request_key,
                    evidence,
                }
            }
            0x81 => Body::Nonce {
                nonce: b.array("nonce")?,
                valid_for_ms: b.u32("validity")?,
            },
            0x82 => Body::Pending,
            0x83 => Body::Released {
                class: class(&mut b)?,
                holder_id: holder_id(&mut b)?,
                envelope: Envelope {
                    encapped_key: b.array::<ENCAPPED_KEY_LEN>("encapsulated key")?,
                    ciphertext: get_bytes(&mut b, "ciphertext", 1, MAX_CIPHERTEXT_LEN)?,
                },
                host_quote: if b.remaining() == 0 {
                    None
                } else {
                    Some(get_host_quote(&mut b)?)
                },
            },
            0x84 => Body::HostReleased {
                holder_id: holder_id(&mut b)?,
                credential: KeyId::new(b.short_str("credential")?)
                    .map_err(|e| MessageError::Name(e.to_string()))?,
                epoch: b.u64("epoch")?,
                index: check_index(b.u8("share index")?)?,
                host: check_host_id(b.short_str("host id")?)?.to_owned(),
                released: get_bytes(&mut b, "released shard", 1, shard_release::MAX_RELEASED_LEN)?,
            },
            0xFF => {
                let code = RefusalCode::from_u16(b.u16("code")?);
                let reason = get_bytes(&mut b, "reason", 0, MAX_REASON_LEN)?;
                let reason = String::from_utf8(reason).map_err(|_| MessageError::ReasonEncoding)?;
                Body::Refused { code, reason }
            }
            other => return Err(MessageError::UnknownKind(other)),
        };
        if b.remaining() != 0 {
            return Err(MessageError::TrailingBytes(b.remaining()));
        }
        Ok(Self { request_id, body })
    }
}

/// A sealed fragment: the largest fragment plus the AES-GCM tag.
const MAX_CIPHERTEXT_LEN: usize = MAX_FRAGMENT_LEN + crate::envelope::TAG_LEN;

fn class(r: &mut Reader<'_>) -> Result<HolderClass> {
    let code = r.u8("holder class")?;
    HolderClass::from_code(code).ok_or(MessageError::UnknownClass(code))
}

fn holder_id(r: &mut Reader<'_>) -> Result<HolderId> {
    HolderId::new(r.short_str("holder id")?).map_err(|e| MessageError::HolderId(e.to_string()))
}

/// A share index, 1..=255.
fn check_index(index: u8) -> Result<u8> {
    if index == 0 {
        return Err(MessageError::ZeroIndex);
    }
    Ok(index)
}

/// A shard host id: 1..=64 of the characters a key id allows (keyshard-shards' host ids are
/// a subset).
fn check_host_id(host: &str) -> Result<&str> {
    if host.len() > shard_release::MAX_HOST_ID_LEN {
        return Err(MessageError::FieldLength {
            field: "host id",
            len: host.len(),
            min: 1,
            max: shard_release::MAX_HOST_ID_LEN,
        });
    }
    KeyId::new(host).map_err(|e| MessageError::Name(format!("host id: {e}")))?;
    Ok(host)
}

fn put_host_quote(out: &mut Vec<u8>, quote: &HostQuote) -> Result<()> {
    out.push(1);
    put_bytes(out, "quote attest", &quote.attest, 1, MAX_ATTEST_LEN)?;
    out.extend_from_slice(&quote.signature);
    let count = u8::try_from(quote.path.len())
        .ok()
        .filter(|n| usize::from(*n) <= merkle::MAX_PATH_LEN)
        .ok_or(MessageError::FieldLength {
            field: "inclusion path",
            len: quote.path.len(),
            min: 0,
            max: merkle::MAX_PATH_LEN,
        })?;
    out.push(count);
    for step in &quote.path {
        out.push(u8::from(step.sibling_on_left));
        out.extend_from_slice(&step.sibling);
    }
    Ok(())
}

fn get_host_quote(r: &mut Reader<'_>) -> Result<HostQuote> {
    let tag = r.u8("host quote tag")?;
    if tag != 1 {
        return Err(MessageError::UnknownQuote(tag));
    }
    let attest = get_bytes(r, "quote attest", 1, MAX_ATTEST_LEN)?;
    let signature = r.array("quote signature")?;
    let count = usize::from(r.u8("inclusion path length")?);
    if count > merkle::MAX_PATH_LEN {
        return Err(MessageError::FieldLength {
            field: "inclusion path",
            len: count,
            min: 0,
            max: merkle::MAX_PATH_LEN,
        });
    }
    let path = (0..count)
        .map(|_| {
            let sibling_on_left = match r.u8("path side")? {
                0 => false,
                1 => true,
                other => return Err(MessageError::PathSide(other)),
            };
            Ok(merkle::PathStep {
                sibling_on_left,
                sibling: r.array("path sibling")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(HostQuote {
        attest,
        signature,
        path,
    })
}

fn get_bytes(r: &mut Reader<'_>, field: &'static str, min: usize, max: usize) -> Result<Vec<u8>> {
    let len = usize::from(r.u16(field)?);
    if len < min || len > max {
        return Err(MessageError::FieldLength {
            field,
            len,
            min,
            max,
        });
    }
    Ok(r.take(len, field)?.to_vec())
}

fn put_bytes(
    out: &mut Vec<u8>,
    field: &'static str,
    bytes: &[u8],
    min: usize,
    max: usize,
) -> Result<()> {
    let len = u16::try_from(bytes.len())
        .ok()
        .filter(|len| (min..=max).contains(&usize::from(*len)))
        .ok_or(MessageError::FieldLength {
            field,
            len: bytes.len(),
            min,
            max,
        })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// Holder ids (16), key ids and host ids (64) fit a one-byte length by construction.
fn put_short_str(out: &mut Vec<u8>, text: &str) {
    out.push(text.len() as u8);
    out.extend_from_slice(text.as_bytes());
}

fn truncate_utf8(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default()
}

#[cfg(test)]
mod tests;
