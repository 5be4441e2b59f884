//! TPM 2.0 constants from the TCG specification (Part 2, Structures) that the parsers and the
//! software policy and quote computations need, and what each PCR bank means on the wire.

use keyshard_core::policy::PcrBank;

/// TPM_GENERATED_VALUE: the first four bytes of every structure the TPM signs ("\xffTCG").
pub const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// TPM_ST_ATTEST_QUOTE: the TPMS_ATTEST type of a TPM2_Quote.
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
/// TPM_ST_ATTEST_CERTIFY: the TPMS_ATTEST type of a TPM2_Certify.
pub const TPM_ST_ATTEST_CERTIFY: u16 = 0x8017;
/// TPM_CC_PolicyPCR: the command code hashed into a PolicyPCR policy digest.
pub const TPM_CC_POLICY_PCR: u32 = 0x0000_017f;

/// TPM_ALG_SHA1.
pub const TPM_ALG_SHA1: u16 = 0x0004;
/// TPM_ALG_SHA256.
pub const TPM_ALG_SHA256: u16 = 0x000b;
/// TPM_ALG_SHA384.
pub const TPM_ALG_SHA384: u16 = 0x000c;
/// TPM_ALG_NULL: "none" in a scheme, symmetric or KDF field.
pub const TPM_ALG_NULL: u16 = 0x0010;
/// TPM_ALG_ECDSA: the signing scheme of the attestation key.
pub const TPM_ALG_ECDSA: u16 = 0x0018;
/// TPM_ALG_ECDH: the key-exchange scheme of an ECC decrypt key.
pub const TPM_ALG_ECDH: u16 = 0x0019;
/// TPM_ALG_ECDAA: the one ECC scheme whose details carry a count after the hash.
pub const TPM_ALG_ECDAA: u16 = 0x001a;
/// TPM_ALG_ECC: the type of an ECC key's public area.
pub const TPM_ALG_ECC: u16 = 0x0023;
/// TPM_ECC_NIST_P256.
pub const TPM_ECC_NIST_P256: u16 = 0x0003;

/// TPMA_OBJECT bits (TPM 2.0 Part 2, 8.3).
pub mod object_attr {
    pub const FIXED_TPM: u32 = 1 << 1;
    pub const ST_CLEAR: u32 = 1 << 2;
    pub const FIXED_PARENT: u32 = 1 << 4;
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    pub const NO_DA: u32 = 1 << 10;
    pub const ENCRYPTED_DUPLICATION: u32 = 1 << 11;
    pub const RESTRICTED: u32 = 1 << 16;
    pub const DECRYPT: u32 = 1 << 17;
    pub const SIGN_ENCRYPT: u32 = 1 << 18;
    pub const X509_SIGN: u32 = 1 << 19;

    /// Every bit with a name, and its name: to say which attribute differs.
    pub const NAMED: [(u32, &str); 12] = [
        (FIXED_TPM, "fixedTPM"),
        (ST_CLEAR, "stClear"),
        (FIXED_PARENT, "fixedParent"),
        (SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
        (USER_WITH_AUTH, "userWithAuth"),
        (ADMIN_WITH_POLICY, "adminWithPolicy"),
        (NO_DA, "noDA"),
        (ENCRYPTED_DUPLICATION, "encryptedDuplication"),
        (RESTRICTED, "restricted"),
        (DECRYPT, "decrypt"),
        (SIGN_ENCRYPT, "sign"),
        (X509_SIGN, "x509sign"),
    ];
}

/// Persistent handle of the storage root key (the TCG-recommended SRK handle).
pub const SRK_HANDLE: u32 = 0x8100_0001;
/// Persistent handle of the attestation key.
pub const AK_HANDLE: u32 = 0x8100_0002;

/// PCR indices a PC client TPM has: 0..=23.
pub const PCR_COUNT: u8 = 24;
/// Bytes of a PCR bitmap for 24 PCRs (TPMS_PCR_SELECTION.sizeofSelect).
pub const PCR_SELECT_SIZE: u8 = 3;
/// TPML_DIGEST holds at most 8 digests: one PCR_Read returns at most 8 PCRs.
pub const PCR_READ_MAX: usize = 8;
/// Largest secret a keyed-hash sealed object holds (MAX_SYM_DATA).
pub const MAX_SEALED_DATA: usize = 128;

/// The TPM_ALG_ID of a bank's hash.
pub fn bank_alg(bank: PcrBank) -> u16 {
    match bank {
        PcrBank::Sha1 => TPM_ALG_SHA1,
        PcrBank::Sha256 => TPM_ALG_SHA256,
        PcrBank::Sha384 => TPM_ALG_SHA384,
    }
}

/// The bank whose hash is `alg`, if keyshard knows it.
pub fn bank_from_alg(alg: u16) -> Option<PcrBank> {
    match alg {
        TPM_ALG_SHA1 => Some(PcrBank::Sha1),
        TPM_ALG_SHA256 => Some(PcrBank::Sha256),
        TPM_ALG_SHA384 => Some(PcrBank::Sha384),
        _ => None,
    }
}

/// Bytes of one PCR value in `bank`.
pub fn digest_len(bank: PcrBank) -> usize {
    match bank {
        PcrBank::Sha1 => 20,
        PcrBank::Sha256 => 32,
        PcrBank::Sha384 => 48,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banks_round_trip_through_their_algorithm_ids() {
        for bank in [PcrBank::Sha1, PcrBank::Sha256, PcrBank::Sha384] {
            assert_eq!(bank_from_alg(bank_alg(bank)), Some(bank));
        }
        assert_eq!(bank_from_alg(0x000d), None, "sha512 is not a keyshard bank");
    }
}
