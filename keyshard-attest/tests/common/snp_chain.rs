//! Test-signed SEV-SNP evidence shaped like AMD's: an ARK and ASK (RSA-PSS SHA-384, salt 48),
//! a VCEK (ECDSA P-384) with AMD's extensions, and reports signed by it. RSA keys come from
//! aws-lc-rs (fast) and sign through the `rsa` crate's PSS, which writes AMD's parameters.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::str::FromStr;
use std::time::Duration;

use p384::ecdsa::signature::Signer as _;
use rsa::pkcs8::DecodePrivateKey;
use rsa::rand_core::{CryptoRng, RngCore};
use rsa::sha2::Sha384;
use rsa::{RsaPrivateKey, RsaPublicKey};
use x509_cert::Certificate;
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::der::asn1::{Ia5StringRef, ObjectIdentifier};
use x509_cert::der::{self, Encode};
use x509_cert::ext::AsExtension;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::Validity;

use keyshard_attest::snp::report::{
    OFF_CHIP_ID, OFF_COMMITTED_TCB, OFF_CPUID, OFF_CURRENT_TCB, OFF_KEY_INFO, OFF_LAUNCH_TCB,
    OFF_MEASUREMENT, OFF_PLATFORM_INFO, OFF_POLICY, OFF_REPORT_DATA, OFF_REPORTED_TCB,
    OFF_SIG_ALGO, OFF_SIG_R, OFF_SIG_S, OFF_VERSION, OFF_VMPL, REPORT_LEN, SIGNED_LEN,
};
use keyshard_attest::snp::vcek::oid;
use keyshard_attest::snp::{Product, Tcb, TrustAnchors};

/// rand_core 0.6 randomness from aws-lc-rs, for the RustCrypto signers and the builder.
pub struct AwsLcRng;

impl RngCore for AwsLcRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        aws_lc_rs::rand::fill(dest).unwrap();
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for AwsLcRng {}

pub type PssSigner = rsa::pss::SigningKey<Sha384>;

/// An RSA key made by aws-lc-rs (C keygen: under a second at 4096 bits) for the `rsa` crate.
pub fn rsa_key(bits: usize) -> RsaPrivateKey {
    use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
    use aws_lc_rs::rsa::{KeyPair, KeySize};
    let size = match bits {
        2048 => KeySize::Rsa2048,
        3072 => KeySize::Rsa3072,
        4096 => KeySize::Rsa4096,
        _ => panic!("unsupported RSA size {bits}"),
    };
    let pair = KeyPair::generate(size).unwrap();
    let der: Pkcs8V1Der<'static> = pair.as_der().unwrap();
    RsaPrivateKey::from_pkcs8_der(der.as_ref()).unwrap()
}

/// AMD's name layout (OU, C, L, ST, O, CN); RFC 4514 strings list the RDNs last first.
pub fn amd_name(cn: &str) -> Name {
    Name::from_str(&format!(
        "CN={cn},O=Advanced Micro Devices,ST=CA,L=Santa Clara,C=US,OU=Engineering"
    ))
    .unwrap()
}

fn validity() -> Validity {
    Validity::from_now(Duration::from_secs(3600 * 24 * 365 * 10)).unwrap()
}

/// An extension whose extnValue contents are given raw; x509-cert 0.2 ties an OID to a type.
macro_rules! raw_ext {
    ($name:ident, $oid:expr, $critical:expr) => {
        pub struct $name(pub Vec<u8>);
        impl der::oid::AssociatedOid for $name {
            const OID: ObjectIdentifier = $oid;
        }
        impl der::Encode for $name {
            fn encoded_len(&self) -> der::Result<der::Length> {
                der::Length::try_from(self.0.len())
            }
            fn encode(&self, w: &mut impl der::Writer) -> der::Result<()> {
                w.write(&self.0)
            }
        }
        impl AsExtension for $name {
            fn critical(&self, _: &Name, _: &[x509_cert::ext::Extension]) -> bool {
                $critical
            }
        }
    };
}
raw_ext!(ExtStructVersion, oid::STRUCT_VERSION, false);
raw_ext!(ExtProductName, oid::PRODUCT_NAME, false);
raw_ext!(ExtBlSpl, oid::BL_SPL, false);
raw_ext!(ExtTeeSpl, oid::TEE_SPL, false);
raw_ext!(ExtSnpSpl, oid::SNP_SPL, false);
raw_ext!(ExtUcodeSpl, oid::UCODE_SPL, false);
raw_ext!(ExtFmcSpl, oid::FMC_SPL, false);
raw_ext!(ExtHwid, oid::HWID, false);
raw_ext!(ExtCspId, oid::CSP_ID, false);
raw_ext!(
    ExtUnknownCritical,
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.99"),
    true
);

/// A DER INTEGER as AMD writes SPLs: `02 01 vv`, `02 02 00 vv` from 0x80 on.
pub fn der_int(v: u8) -> Vec<u8> {
    v.to_der().unwrap()
}

/// Extensions added after the regular ones, for negative tests.
#[derive(Debug, Clone)]
pub enum ExtraExtension {
    /// A second snpSPL with these contents.
    SnpSpl(Vec<u8>),
    CspId,
    UnknownCritical,
}

#[derive(Debug, Clone)]
pub struct VcekSpec {
    pub product_name: String,
    pub tcb: Tcb,
    pub hwid: Vec<u8>,
    /// AMD extensions to leave out.
    pub omit: Vec<ObjectIdentifier>,
    /// Replaces the snpSPL value (a malformed one, say).
    pub snp_spl_value: Option<Vec<u8>>,
    pub extra: Vec<ExtraExtension>,
}

pub const TCB: Tcb = Tcb {
    bootloader: 3,
    tee: 0,
    snp: 8,
    microcode: 115,
    fmc: None,
};
pub const HWID: [u8; 64] = [0xC5; 64];

impl Default for VcekSpec {
    fn default() -> Self {
        Self {
            product_name: "Milan-B0".to_owned(),
            tcb: TCB,
            hwid: HWID.to_vec(),
            omit: Vec::new(),
            snp_spl_value: None,
            extra: Vec::new(),
        }
    }
}

/// An issued test VCEK: its signing key and its DER.
pub struct TestVcek {
    pub key: p384::ecdsa::SigningKey,
    pub cert: Certificate,
    pub der: Vec<u8>,
}

/// A test ARK and ASK for one product.
pub struct TestCa {
    pub product: Product,
    ask_key: RsaPrivateKey,
    pub ark: Certificate,
    pub ask: Certificate,
}

impl TestCa {
    pub fn new(bits: usize, product: Product) -> Self {
        let ark_key = rsa_key(bits);
        let ask_key = rsa_key(bits);
        let ark_signer = PssSigner::new(ark_key.clone());
        let ark_name = amd_name(&format!("ARK-{product}"));
        let ark = CertificateBuilder::new(
            Profile::Root,
            SerialNumber::from(0x10000u32),
            validity(),
            ark_name.clone(),
            SubjectPublicKeyInfoOwned::from_key(RsaPublicKey::from(&ark_key)).unwrap(),
            &ark_signer,
        )
        .unwrap()
        .build_with_rng::<rsa::pss::Signature>(&mut AwsLcRng)
        .unwrap();
        let ask = CertificateBuilder::new(
            Profile::SubCA {
                issuer: ark_name,
                path_len_constraint: Some(0),
            },
            SerialNumber::from(0x10001u32),
            validity(),
            amd_name(&format!("SEV-{product}")),
            SubjectPublicKeyInfoOwned::from_key(RsaPublicKey::from(&ask_key)).unwrap(),
            &ark_signer,
        )
        .unwrap()
        .build_with_rng::<rsa::pss::Signature>(&mut AwsLcRng)
        .unwrap();
        Self {
            product,
            ask_key,
            ark,
            ask,
        }
    }

    pub fn ark_der(&self) -> Vec<u8> {
        self.ark.to_der().unwrap()
    }

    pub fn ask_der(&self) -> Vec<u8> {
        self.ask.to_der().unwrap()
    }

    /// These roots pinned for their product, as the coordinator pins AMD's.
    pub fn anchors(&self) -> TrustAnchors {
        TrustAnchors::none()
            .with(self.product, &self.ark_der(), &self.ask_der())
            .unwrap()
    }

    pub fn issue_vcek(&self, spec: &VcekSpec) -> TestVcek {
        let key = p384::ecdsa::SigningKey::random(&mut AwsLcRng);
        let spki = SubjectPublicKeyInfoOwned::from_key(*key.verifying_key()).unwrap();
        let ask_signer = PssSigner::new(self.ask_key.clone());
        let mut b = CertificateBuilder::new(
            Profile::Leaf {
                issuer: amd_name(&format!("SEV-{}", self.product)),
                enable_key_agreement: false,
                enable_key_encipherment: false,
            },
            SerialNumber::from(0u32),
            validity(),
            amd_name("SEV-VCEK"),
            spki,
            &ask_signer,
        )
        .unwrap();
        let keep = |id: ObjectIdentifier| !spec.omit.contains(&id);
        if keep(oid::STRUCT_VERSION) {
            b.add_extension(&ExtStructVersion(der_int(0))).unwrap();
        }
        if keep(oid::PRODUCT_NAME) {
            let name = Ia5StringRef::new(&spec.product_name)
                .unwrap()
                .to_der()
                .unwrap();
            b.add_extension(&ExtProductName(name)).unwrap();
        }
        if keep(oid::BL_SPL) {
            b.add_extension(&ExtBlSpl(der_int(spec.tcb.bootloader)))
                .unwrap();
        }
        if keep(oid::TEE_SPL) {
            b.add_extension(&ExtTeeSpl(der_int(spec.tcb.tee))).unwrap();
        }
        if keep(oid::SNP_SPL) {
            let value = spec
                .snp_spl_value
                .clone()
                .unwrap_or_else(|| der_int(spec.tcb.snp));
            b.add_extension(&ExtSnpSpl(value)).unwrap();
        }
        if keep(oid::UCODE_SPL) {
            b.add_extension(&ExtUcodeSpl(der_int(spec.tcb.microcode)))
                .unwrap();
        }
        if let (Some(fmc), true) = (spec.tcb.fmc, keep(oid::FMC_SPL)) {
            b.add_extension(&ExtFmcSpl(der_int(fmc))).unwrap();
        }
        if keep(oid::HWID) {
            b.add_extension(&ExtHwid(spec.hwid.clone())).unwrap();
        }
        for extra in &spec.extra {
            match extra {
                ExtraExtension::SnpSpl(value) => {
                    b.add_extension(&ExtSnpSpl(value.clone())).unwrap()
                }
                ExtraExtension::CspId => b
                    .add_extension(&ExtCspId(
                        Ia5StringRef::new("csp").unwrap().to_der().unwrap(),
                    ))
                    .unwrap(),
                ExtraExtension::UnknownCritical => {
                    b.add_extension(&ExtUnknownCritical(der_int(1))).unwrap()
                }
            }
        }
        let cert = b
            .build_with_rng::<rsa::pss::Signature>(&mut AwsLcRng)
            .unwrap();
        let der = cert.to_der().unwrap();
        TestVcek { key, cert, der }
    }
}

/// What a test report says.
#[derive(Debug, Clone)]
pub struct ReportSpec {
    pub product: Product,
    pub version: u32,
    pub policy: u64,
    pub vmpl: u32,
    pub sig_algo: u32,
    pub key_info: u32,
    pub measurement: [u8; 48],
    pub report_data: [u8; 64],
    /// REPORTED_TCB and CURRENT_TCB (the VCEK's).
    pub tcb: Tcb,
    /// COMMITTED_TCB; `tcb` when None.
    pub committed_tcb: Option<Tcb>,
    /// LAUNCH_TCB; `tcb` when None.
    pub launch_tcb: Option<Tcb>,
    /// PLATFORM_INFO: bit 0 SMT enabled, bit 1 TSME enabled.
    pub platform_info: u64,
    pub chip_id: [u8; 64],
}

pub const MEASUREMENT: [u8; 48] = [0x11; 48];

impl Default for ReportSpec {
    fn default() -> Self {
        Self {
            product: Product::Milan,
            version: 3,
            policy: 0x3_0000, // SMT allowed, reserved bit 17; debug (19) and MA (18) clear
            vmpl: 0,
            sig_algo: 1,
            key_info: 0,
            measurement: MEASUREMENT,
            report_data: [0; 64],
            tcb: TCB,
            committed_tcb: None,
            launch_tcb: None,
            platform_info: 1, // SMT enabled, TSME off: what most hosts report
            chip_id: HWID,
        }
    }
}

fn put(b: &mut [u8], offset: usize, bytes: &[u8]) {
    b[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// Lays out a report as the firmware would and signs bytes `0..0x2A0` with the VCEK key.
pub fn build_report(spec: &ReportSpec, vcek_key: &p384::ecdsa::SigningKey) -> Vec<u8> {
    let mut b = vec![0u8; REPORT_LEN];
    let tcb = spec.tcb.to_bytes(spec.product);
    put(&mut b, OFF_VERSION, &spec.version.to_le_bytes());
    put(&mut b, OFF_POLICY, &spec.policy.to_le_bytes());
    put(&mut b, OFF_VMPL, &spec.vmpl.to_le_bytes());
    put(&mut b, OFF_SIG_ALGO, &spec.sig_algo.to_le_bytes());
    put(&mut b, OFF_CURRENT_TCB, &tcb);
    put(&mut b, OFF_PLATFORM_INFO, &spec.platform_info.to_le_bytes());
    put(&mut b, OFF_KEY_INFO, &spec.key_info.to_le_bytes());
    put(&mut b, OFF_REPORT_DATA, &spec.report_data);
    put(&mut b, OFF_MEASUREMENT, &spec.measurement);
    put(&mut b, OFF_REPORTED_TCB, &tcb);
    if spec.version >= 3 {
        let cpuid: [u8; 3] = match spec.product {
            Product::Milan => [0x19, 0x01, 0x01],
            Product::Genoa => [0x19, 0x11, 0x01],
            Product::Turin => [0x1A, 0x02, 0x00],
        };
        put(&mut b, OFF_CPUID, &cpuid);
    }
    put(&mut b, OFF_CHIP_ID, &spec.chip_id);
    let committed = spec
        .committed_tcb
        .unwrap_or(spec.tcb)
        .to_bytes(spec.product);
    put(&mut b, OFF_COMMITTED_TCB, &committed);
    put(&mut b, 0x1E8, &[4, 55, 1]); // CURRENT build, minor, major
    put(&mut b, 0x1EC, &[4, 55, 1]); // COMMITTED
    let launch = spec.launch_tcb.unwrap_or(spec.tcb).to_bytes(spec.product);
    put(&mut b, OFF_LAUNCH_TCB, &launch);
    sign_report(&mut b, vcek_key);
    b
}

/// (Re)signs bytes `0..0x2A0` in place: r and s little-endian in their 72-byte fields.
pub fn sign_report(b: &mut [u8], vcek_key: &p384::ecdsa::SigningKey) {
    let sig: p384::ecdsa::Signature = vcek_key.sign(&b[..SIGNED_LEN]);
    let be = sig.to_bytes();
    b[OFF_SIG_R..OFF_SIG_R + 72].fill(0);
    b[OFF_SIG_S..OFF_SIG_S + 72].fill(0);
    for i in 0..48 {
        b[OFF_SIG_R + i] = be[47 - i];
        b[OFF_SIG_S + i] = be[95 - i];
    }
}
