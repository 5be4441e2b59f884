//! AMD's VCEK certificate: its DER, its product, the AMD extensions that say which chip and TCB
//! it was issued for (VCEK/KDS spec 57230), and its P-384 key. The `sev` crate checks none of the
//! extensions; here a missing, duplicated or malformed one is a refusal.

use x509_cert::Certificate;
use x509_cert::der::asn1::{Ia5StringRef, ObjectIdentifier};
use x509_cert::der::{Decode, Encode};

use super::product::Product;
use super::tcb::Tcb;

/// Object identifiers of the extensions and keys a VCEK carries.
pub mod oid {
    use x509_cert::der::asn1::ObjectIdentifier as Oid;

    pub const STRUCT_VERSION: Oid = Oid::new_unwrap("1.3.6.1.4.1.3704.1.1");
    pub const PRODUCT_NAME: Oid = Oid::new_unwrap("1.3.6.1.4.1.3704.1.2");
    pub const BL_SPL: Oid = Oid::new_unwrap("1.3.6.1.4.1.3704.1.3.1");
    pub const TEE_SPL: Oid = Oid::new_unwrap("1.3.6.1.4.1.3704.1.3.2");
    pub const SNP_SPL: Oid = Oid::new_unwrap("1.3.6.1.4.1.3704.1.3.3");
    pub const UCODE_SPL: Oid = Oid::new_unwrap("1.3.6.1.4.1.3704.1.3.8");
    pub const FMC_SPL: Oid = Oid::new_unwrap("1.3.6.1.4.1.3704.1.3.9");
    pub const HWID: Oid = Oid::new_unwrap("1.3.6.1.4.1.3704.1.4");
    /// Present in VLEKs only.
    pub const CSP_ID: Oid = Oid::new_unwrap("1.3.6.1.4.1.3704.1.5");

    pub const BASIC_CONSTRAINTS: Oid = Oid::new_unwrap("2.5.29.19");
    pub const KEY_USAGE: Oid = Oid::new_unwrap("2.5.29.15");

    pub const EC_PUBLIC_KEY: Oid = Oid::new_unwrap("1.2.840.10045.2.1");
    pub const SECP384R1: Oid = Oid::new_unwrap("1.3.132.0.34");
}

/// Critical extensions a VCEK may carry; any other critical extension is refused (RFC 5280).
const KNOWN_CRITICAL: [ObjectIdentifier; 2] = [oid::BASIC_CONSTRAINTS, oid::KEY_USAGE];

/// Largest VCEK accepted (AMD's are about 1.4 KB): the one limit, the broker's, so a VCEK read
/// from a file, the CLI or the VCEK directory is held to what a guest's request may carry.
pub use keyshard_core::broker::MAX_VCEK_LEN;

/// Length of an uncompressed SEC1 P-384 point: 0x04 || X || Y.
const P384_POINT_LEN: usize = 97;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VcekError {
    #[error("the VCEK is not a DER X.509 certificate: {0}")]
    Der(String),
    #[error("the VCEK is {0} bytes, more than {MAX_VCEK_LEN}")]
    TooLarge(usize),
    #[error("the VCEK has no {0} extension")]
    Missing(&'static str),
    #[error("the VCEK has the extension {0} twice")]
    Duplicate(String),
    #[error("the VCEK's {0} extension is malformed")]
    Malformed(&'static str),
    #[error("the VCEK names an unknown product {0:?}")]
    UnknownProduct(String),
    #[error("the VCEK's hwID is {len} bytes, a {product} hwID is {expected}")]
    HwIdLength {
        product: Product,
        len: usize,
        expected: usize,
    },
    #[error("the VCEK carries a cspID: it is a VLEK, which keyshard does not accept")]
    Vlek,
    #[error("the VCEK's key is not an ECDSA P-384 key")]
    NotP384,
    #[error("the VCEK has an unknown critical extension {0}")]
    UnknownCritical(String),
}

pub type Result<T> = std::result::Result<T, VcekError>;

/// A parsed VCEK certificate and the product its productName names. Nothing about it is trusted
/// until its chain verifies; the product only chooses which pinned roots to check it against.
#[derive(Debug, Clone)]
pub struct Vcek {
    cert: Certificate,
    product: Product,
}

/// What a VCEK says about its chip and firmware, read from its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcekInfo {
    pub product: Product,
    /// productName as written, for example `Milan-B0`.
    pub product_name: String,
    pub tcb: Tcb,
    /// The chip's hwID: 64 bytes, 8 on Turin.
    pub hwid: Vec<u8>,
    /// The public key, an uncompressed SEC1 P-384 point (97 bytes).
    pub public_key: Vec<u8>,
}

impl Vcek {
    /// Parses DER (strictly, no trailing bytes) and reads productName.
    pub fn from_der(der: &[u8]) -> Result<Self> {
        if der.len() > MAX_VCEK_LEN {
            return Err(VcekError::TooLarge(der.len()));
        }
        let cert = Certificate::from_der(der).map_err(|e| VcekError::Der(e.to_string()))?;
        let name = product_name(&cert)?;
        let product =
            Product::from_product_name(&name).ok_or(VcekError::UnknownProduct(name.clone()))?;
        Ok(Self { cert, product })
    }

    pub fn product(&self) -> Product {
        self.product
    }

    pub fn certificate(&self) -> &Certificate {
        &self.cert
    }

    /// The same certificate as the `sev` crate's type, for its chain check.
    pub fn to_sev(&self) -> sev::certs::snp::Certificate {
        self.cert.clone().into()
    }

    /// The DER encoding.
    pub fn to_der(&self) -> Result<Vec<u8>> {
        self.cert
            .to_der()
            .map_err(|e| VcekError::Der(e.to_string()))
    }

    /// Reads the TCB SPLs, hwID and key. Fails closed on anything missing, duplicated,
    /// malformed or unknown-and-critical.
    pub fn info(&self) -> Result<VcekInfo> {
        let found = AmdExtensions::read(&self.cert)?;
        let product_name = found
            .product_name
            .ok_or(VcekError::Missing("productName"))?;
        let hwid = found.hwid.ok_or(VcekError::Missing("hwID"))?;
        if hwid.len() != self.product.hwid_len() {
            return Err(VcekError::HwIdLength {
                product: self.product,
                len: hwid.len(),
                expected: self.product.hwid_len(),
            });
        }
        let fmc = match self.product {
            Product::Turin => Some(found.fmc.ok_or(VcekError::Missing("fmcSPL"))?),
            Product::Milan | Product::Genoa => None,
        };
        Ok(VcekInfo {
            product: self.product,
            product_name,
            tcb: Tcb {
                bootloader: found.bootloader.ok_or(VcekError::Missing("blSPL"))?,
                tee: found.tee.ok_or(VcekError::Missing("teeSPL"))?,
                snp: found.snp.ok_or(VcekError::Missing("snpSPL"))?,
                microcode: found.microcode.ok_or(VcekError::Missing("ucodeSPL"))?,
                fmc,
            },
            hwid,
            public_key: p384_point(&self.cert)?,
        })
    }
}

/// productName alone: it picks the roots before anything else is read.
fn product_name(cert: &Certificate) -> Result<String> {
    let mut name = None;
    for ext in extensions(cert) {
        if ext.extn_id == oid::PRODUCT_NAME {
            if name.is_some() {
                return Err(VcekError::Duplicate(oid::PRODUCT_NAME.to_string()));
            }
            name = Some(ia5(ext.extn_value.as_bytes(), "productName")?);
        }
    }
    name.ok_or(VcekError::Missing("productName"))
}

fn extensions(cert: &Certificate) -> &[x509_cert::ext::Extension] {
    cert.tbs_certificate.extensions.as_deref().unwrap_or(&[])
}

/// An SPL is a DER INTEGER 0..=255 (`02 01 xx`, or `02 02 00 xx` from 0x80 on).
fn spl(value: &[u8], what: &'static str) -> Result<u8> {
    u8::from_der(value).map_err(|_| VcekError::Malformed(what))
}

fn ia5(value: &[u8], what: &'static str) -> Result<String> {
    Ia5StringRef::from_der(value)
        .map(|s| s.as_str().to_owned())
        .map_err(|_| VcekError::Malformed(what))
}

/// The AMD extensions found, each at most once.
#[derive(Default)]
struct AmdExtensions {
    product_name: Option<String>,
    bootloader: Option<u8>,
    tee: Option<u8>,
    snp: Option<u8>,
    microcode: Option<u8>,
    fmc: Option<u8>,
    hwid: Option<Vec<u8>>,
}

/// Stores `value` in `slot` unless it is already set.
fn once<T>(slot: &mut Option<T>, value: T, id: &ObjectIdentifier) -> Result<()> {
    if slot.is_some() {
        return Err(VcekError::Duplicate(id.to_string()));
    }
    *slot = Some(value);
    Ok(())
}

impl AmdExtensions {
    fn read(cert: &Certificate) -> Result<Self> {
        let mut found = Self::default();
        let mut seen: Vec<ObjectIdentifier> = Vec::new();
        for ext in extensions(cert) {
            let id = &ext.extn_id;
            if seen.contains(id) {
                return Err(VcekError::Duplicate(id.to_string()));
            }
            seen.push(*id);
            let value = ext.extn_value.as_bytes();
            match *id {
                oid::PRODUCT_NAME => once(&mut found.product_name, ia5(value, "productName")?, id)?,
                oid::BL_SPL => once(&mut found.bootloader, spl(value, "blSPL")?, id)?,
                oid::TEE_SPL => once(&mut found.tee, spl(value, "teeSPL")?, id)?,
                oid::SNP_SPL => once(&mut found.snp, spl(value, "snpSPL")?, id)?,
                oid::UCODE_SPL => once(&mut found.microcode, spl(value, "ucodeSPL")?, id)?,
                oid::FMC_SPL => once(&mut found.fmc, spl(value, "fmcSPL")?, id)?,
                // hwID is the raw bytes, without a DER wrapper.
                oid::HWID => once(&mut found.hwid, value.to_vec(), id)?,
                oid::CSP_ID => return Err(VcekError::Vlek),
                _ if ext.critical && !KNOWN_CRITICAL.contains(id) => {
                    return Err(VcekError::UnknownCritical(id.to_string()));
                }
                _ => {}
            }
        }
        Ok(found)
    }
}

/// The subject key: id-ecPublicKey on secp384r1, an uncompressed point.
fn p384_point(cert: &Certificate) -> Result<Vec<u8>> {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
    if spki.algorithm.oid != oid::EC_PUBLIC_KEY || curve != Some(oid::SECP384R1) {
        return Err(VcekError::NotP384);
    }
    let point = spki
        .subject_public_key
        .as_bytes()
        .ok_or(VcekError::NotP384)?;
    if point.len() != P384_POINT_LEN || point.first() != Some(&0x04) {
        return Err(VcekError::NotP384);
    }
    Ok(point.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snp::fixtures::{MILAN_VCEK_DER, milan_report_bytes};
    use crate::snp::report::Report;

    #[test]
    fn real_milan_vcek_extensions() {
        let vcek = Vcek::from_der(MILAN_VCEK_DER).unwrap();
        assert_eq!(vcek.product(), Product::Milan);
        let info = vcek.info().unwrap();
        assert_eq!(info.product_name, "Milan-B0");
        assert_eq!(
            info.tcb,
            Tcb {
                bootloader: 3,
                tee: 0,
                snp: 8,
                microcode: 115,
                fmc: None
            }
        );
        let report = Report::from_bytes(&milan_report_bytes()).unwrap();
        assert_eq!(info.hwid.as_slice(), report.chip_id().as_slice());
        assert_eq!(info.public_key.len(), 97);
        assert_eq!(vcek.to_der().unwrap(), MILAN_VCEK_DER);
    }

    #[test]
    fn garbage_and_trailing_bytes_are_refused() {
        assert!(matches!(
            Vcek::from_der(b"not a certificate"),
            Err(VcekError::Der(_))
        ));
        let mut trailing = MILAN_VCEK_DER.to_vec();
        trailing.push(0);
        assert!(matches!(Vcek::from_der(&trailing), Err(VcekError::Der(_))));
        assert!(matches!(
            Vcek::from_der(&vec![0u8; MAX_VCEK_LEN + 1]),
            Err(VcekError::TooLarge(_))
        ));
    }

    /// Issue 8, item 1: the verifier allowed 16 KiB and the broker 4 KiB. One limit now: a VCEK
    /// one byte over what a broker request carries is refused by its size, before any parsing.
    #[test]
    fn item1_one_vcek_limit_for_the_broker_and_the_verifier() {
        let over = vec![0x30u8; keyshard_core::broker::MAX_VCEK_LEN + 1];
        assert_eq!(
            Vcek::from_der(&over).err(),
            Some(VcekError::TooLarge(keyshard_core::broker::MAX_VCEK_LEN + 1))
        );
    }

    #[test]
    fn spl_is_a_der_integer() {
        assert_eq!(spl(&[0x02, 0x01, 0x73], "x"), Ok(0x73));
        assert_eq!(spl(&[0x02, 0x02, 0x00, 0xD1], "x"), Ok(0xD1));
        assert_eq!(spl(&[0x73], "x"), Err(VcekError::Malformed("x")));
        assert_eq!(
            spl(&[0x02, 0x02, 0x01, 0x00], "x"),
            Err(VcekError::Malformed("x"))
        );
        assert_eq!(
            spl(&[0x02, 0x01, 0x73, 0x00], "x"),
            Err(VcekError::Malformed("x"))
        );
    }
}
