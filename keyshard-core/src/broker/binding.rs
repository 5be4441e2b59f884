//! The REPORT_DATA an SEV-SNP guest puts in its report for a share request, and the coordinator
//! expects: SHA-512 over the coordinator's nonce and the request's public key, so a replayed
//! report (old nonce) or a relayed one (another key) does not match. One function for both sides.

use sha2::{Digest, Sha512};

/// An SNP report's REPORT_DATA field.
pub const REPORT_DATA_LEN: usize = 64;

/// SHA-512(nonce || request_key): the 64 bytes a report for this request must carry.
pub fn report_data_binding(
    nonce: &[u8; super::NONCE_LEN],
    request_key: &[u8; crate::envelope::PUBLIC_KEY_LEN],
) -> [u8; REPORT_DATA_LEN] {
    Sha512::new()
        .chain_update(nonce)
        .chain_update(request_key)
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_is_sha512_of_nonce_then_key() {
        let nonce = [1u8; 32];
        let key = [2u8; 32];
        let mut joined = nonce.to_vec();
        joined.extend_from_slice(&key);
        let expected: [u8; 64] = Sha512::digest(&joined).into();
        assert_eq!(report_data_binding(&nonce, &key), expected);
        // Order matters, and so does every byte.
        assert_ne!(report_data_binding(&key, &nonce), expected);
        let mut other = nonce;
        other[31] ^= 1;
        assert_ne!(report_data_binding(&other, &key), expected);
    }

    #[test]
    fn known_answer() {
        // SHA-512 of 64 zero bytes.
        let zero = report_data_binding(&[0; 32], &[0; 32]);
        assert_eq!(
            hex::encode(zero),
            "7be9fda48f4179e611c698a73cff09faf72869431efee6eaad14de0cb44bbf66\
             503f752b7a8eb17083355f3ce6eb7d2806f236b25af96a24e22b887405c20081"
        );
    }
}
