//! Shamir's secret sharing over GF(256), one polynomial per secret byte, through `blahaj`.
//!
//! `blahaj` draws every coefficient uniformly from 0..=255; `sharks`, its ancestor, draws them
//! from 1..=255 (RUSTSEC-2024-0398), which leaks information about the secret once the same
//! secret is shared many times, as rotation does. This module adds the checks `blahaj` leaves to
//! its caller: a sane threshold, and shares that are distinct, non-zero points of equal length.

use std::collections::BTreeSet;

use zeroize::Zeroizing;

/// Longest secret keyshard shares, in bytes: room for any disk key or credential.
pub const MAX_SECRET_LEN: usize = 1024;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SharingError {
    #[error("threshold k = {k} is below 2: a single share would be the secret")]
    ThresholdTooLow { k: u8 },
    #[error("threshold k = {k} exceeds the number of shares n = {n}")]
    ThresholdAboveShares { k: u8, n: u8 },
    #[error("the secret is empty")]
    EmptySecret,
    #[error("the secret is {len} bytes long, at most {MAX_SECRET_LEN} are supported")]
    SecretTooLong { len: usize },
    #[error("{got} shares given, {k} needed")]
    NotEnoughShares { got: usize, k: u8 },
    #[error("a share has index 0, which would be the secret itself")]
    ZeroIndex,
    #[error("two shares have the same index {index}")]
    DuplicateIndex { index: u8 },
    #[error("shares differ in length ({first} and {other} bytes)")]
    UnequalLengths { first: usize, other: usize },
    #[error("a share is empty")]
    EmptyShare,
    #[error("the sharing library refused the shares")]
    Interpolation,
}

pub type Result<T> = std::result::Result<T, SharingError>;

/// k of n: how many shares exist and how many rebuild the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Threshold {
    k: u8,
    n: u8,
}

impl Threshold {
    /// Checks 2 <= k <= n (n <= 255 holds by type).
    pub fn new(k: u8, n: u8) -> Result<Self> {
        if k < 2 {
            return Err(SharingError::ThresholdTooLow { k });
        }
        if k > n {
            return Err(SharingError::ThresholdAboveShares { k, n });
        }
        Ok(Self { k, n })
    }

    pub fn k(self) -> u8 {
        self.k
    }

    pub fn n(self) -> u8 {
        self.n
    }
}

/// One point of the sharing polynomials: x = `index`, y = one byte per secret byte.
#[derive(Clone, PartialEq, Eq)]
pub struct Share {
    index: u8,
    value: Zeroizing<Vec<u8>>,
}

impl Share {
    pub fn new(index: u8, value: Zeroizing<Vec<u8>>) -> Self {
        Self { index, value }
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    pub fn value(&self) -> &[u8] {
        &self.value
    }
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share")
            .field("index", &self.index)
            .field("len", &self.value.len())
            .finish_non_exhaustive()
    }
}

fn check_secret(secret: &[u8]) -> Result<()> {
    if secret.is_empty() {
        return Err(SharingError::EmptySecret);
    }
    if secret.len() > MAX_SECRET_LEN {
        return Err(SharingError::SecretTooLong { len: secret.len() });
    }
    Ok(())
}

/// Splits `secret` into `threshold.n()` shares with indices 1..=n, any `threshold.k()` of which
/// rebuild it. Every call draws fresh random polynomials.
pub fn split(secret: &[u8], threshold: Threshold) -> Result<Vec<Share>> {
    check_secret(secret)?;
    let dealer = blahaj::Sharks(threshold.k()).dealer(secret);
    Ok(dealer
        .take(usize::from(threshold.n()))
        .map(|share| {
            // blahaj's byte form is x followed by the y values; its Share zeroizes on drop.
            let bytes = Zeroizing::new(Vec::from(&share));
            let (index, value) = bytes.split_first().map_or((0, &[][..]), |(x, y)| (*x, y));
            Share::new(index, Zeroizing::new(value.to_vec()))
        })
        .collect())
}

/// Checks that `shares` can rebuild a secret of threshold `k`: enough of them, no index 0, no
/// index twice, all of one non-zero length.
pub fn validate_shares(shares: &[Share], k: u8) -> Result<()> {
    Threshold::new(k, u8::MAX)?;
    if shares.len() < usize::from(k) {
        return Err(SharingError::NotEnoughShares {
            got: shares.len(),
            k,
        });
    }
    let mut seen = BTreeSet::new();
    let first_len = shares.first().map_or(0, |s| s.value.len());
    if first_len == 0 {
        return Err(SharingError::EmptyShare);
    }
    for share in shares {
        if share.index == 0 {
            return Err(SharingError::ZeroIndex);
        }
        if !seen.insert(share.index) {
            return Err(SharingError::DuplicateIndex { index: share.index });
        }
        if share.value.len() != first_len {
            return Err(SharingError::UnequalLengths {
                first: first_len,
                other: share.value.len(),
            });
        }
    }
    Ok(())
}

/// Rebuilds the secret from `k` of `shares` (the first k given), after [`validate_shares`].
pub fn combine(shares: &[Share], k: u8) -> Result<Zeroizing<Vec<u8>>> {
    validate_shares(shares, k)?;
    let points = shares
        .iter()
        .take(usize::from(k))
        .map(|share| {
            let mut bytes = Zeroizing::new(Vec::with_capacity(share.value.len() + 1));
            bytes.push(share.index);
            bytes.extend_from_slice(&share.value);
            blahaj::Share::try_from(bytes.as_slice()).map_err(|_| SharingError::Interpolation)
        })
        .collect::<Result<Vec<_>>>()?;
    blahaj::Sharks(k)
        .recover(&points)
        .map(Zeroizing::new)
        .map_err(|_| SharingError::Interpolation)
}

/// The share at index `x` of the polynomials that `shares` (k of them, validated as for
/// [`combine`]) lie on: how a lost share is re-made from k others without re-dealing.
///
/// In GF(2^8) addition is XOR, so g(t) = f(t + x) has the same degree as f and g(0) = f(x);
/// the points of g are (x_i XOR x, y_i). Recovering g at 0 with the sharing library evaluates
/// f at x in the library's own field.
pub fn evaluate_at(shares: &[Share], k: u8, x: u8) -> Result<Share> {
    validate_shares(shares, k)?;
    if x == 0 {
        return Err(SharingError::ZeroIndex);
    }
    if let Some(known) = shares.iter().find(|s| s.index == x) {
        return Ok(known.clone());
    }
    let shifted: Vec<Share> = shares
        .iter()
        .take(usize::from(k))
        .map(|s| Share::new(s.index ^ x, s.value.clone()))
        .collect();
    Ok(Share::new(x, combine(&shifted, k)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(index: u8, value: &[u8]) -> Share {
        Share::new(index, Zeroizing::new(value.to_vec()))
    }

    #[test]
    fn threshold_bounds() {
        assert_eq!(
            Threshold::new(1, 3),
            Err(SharingError::ThresholdTooLow { k: 1 })
        );
        assert_eq!(
            Threshold::new(4, 3),
            Err(SharingError::ThresholdAboveShares { k: 4, n: 3 })
        );
        assert!(Threshold::new(2, 2).is_ok());
        assert!(Threshold::new(255, 255).is_ok());
    }

    #[test]
    fn split_gives_indices_one_to_n_and_any_k_combine() {
        let secret = b"correct horse battery staple";
        let shares = split(secret, Threshold::new(3, 5).unwrap()).unwrap();
        let indices: Vec<u8> = shares.iter().map(Share::index).collect();
        assert_eq!(indices, vec![1, 2, 3, 4, 5]);
        let picked = vec![shares[4].clone(), shares[0].clone(), shares[2].clone()];
        assert_eq!(combine(&picked, 3).unwrap().as_slice(), secret);
    }

    #[test]
    fn item8_evaluate_at_remakes_every_share_from_any_k() {
        let secret = b"a key that outlives a lost share";
        let shares = split(secret, Threshold::new(3, 7).unwrap()).unwrap();
        let picked = [shares[6].clone(), shares[1].clone(), shares[3].clone()];
        for original in &shares {
            let remade = evaluate_at(&picked, 3, original.index()).unwrap();
            assert_eq!(&remade, original, "share {}", original.index());
        }
        // Beyond n: a share of the same polynomials, consistent with the others.
        let extra = evaluate_at(&picked, 3, 200).unwrap();
        let with_extra = [extra, shares[0].clone(), shares[2].clone()];
        assert_eq!(combine(&with_extra, 3).unwrap().as_slice(), secret);
        assert_eq!(
            evaluate_at(&picked, 3, 0).unwrap_err(),
            SharingError::ZeroIndex
        );
    }

    #[test]
    fn secret_length_is_bounded() {
        let t = Threshold::new(2, 2).unwrap();
        assert_eq!(split(b"", t).unwrap_err(), SharingError::EmptySecret);
        assert_eq!(
            split(&[0; MAX_SECRET_LEN + 1], t).unwrap_err(),
            SharingError::SecretTooLong {
                len: MAX_SECRET_LEN + 1
            }
        );
        assert!(split(&[7; MAX_SECRET_LEN], t).is_ok());
    }

    #[test]
    fn combine_refuses_bad_share_sets() {
        assert_eq!(
            combine(&[share(1, b"a"), share(2, b"b")], 1).unwrap_err(),
            SharingError::ThresholdTooLow { k: 1 }
        );
        assert_eq!(
            combine(&[share(1, b"a")], 2).unwrap_err(),
            SharingError::NotEnoughShares { got: 1, k: 2 }
        );
        assert_eq!(
            combine(&[share(0, b"a"), share(2, b"b")], 2).unwrap_err(),
            SharingError::ZeroIndex
        );
        assert_eq!(
            combine(&[share(3, b"a"), share(3, b"b")], 2).unwrap_err(),
            SharingError::DuplicateIndex { index: 3 }
        );
        assert_eq!(
            combine(&[share(1, b"ab"), share(2, b"b")], 2).unwrap_err(),
            SharingError::UnequalLengths { first: 2, other: 1 }
        );
        assert_eq!(
            combine(&[share(1, b""), share(2, b"")], 2).unwrap_err(),
            SharingError::EmptyShare
        );
    }

    #[test]
    fn debug_never_shows_share_bytes() {
        let text = format!("{:?}", share(1, &[0xAB; 4]));
        assert!(!text.contains("171") && !text.to_lowercase().contains("ab, "));
        assert!(text.contains("len: 4"));
    }

    /// RUSTSEC-2024-0398: with k = 2, share 1 is a1 + s, so it equals the secret exactly when the
    /// random coefficient a1 is 0. A biased dealer (coefficients from 1..=255) never does that;
    /// a uniform one does about once in 256 splits, in every byte position.
    #[test]
    fn coefficients_are_uniform_including_zero() {
        const SPLITS: usize = 20_000;
        let secret = [0x5Au8; 32];
        let t = Threshold::new(2, 2).unwrap();
        let mut equal_at = [0usize; 32];
        for _ in 0..SPLITS {
            let shares = split(&secret, t).unwrap();
            for (pos, (y, s)) in shares[0].value().iter().zip(secret).enumerate() {
                if *y == s {
                    equal_at[pos] += 1;
                }
            }
        }
        // Expected about 78 in position 0 (sd ~8.8); 0 means a biased dealer.
        assert!(
            (30..=140).contains(&equal_at[0]),
            "share 1 matched the secret in byte 0 {} times in {SPLITS} splits",
            equal_at[0]
        );
        // Over all 32 positions: expected 2500 (sd ~50).
        let total: usize = equal_at.iter().sum();
        assert!(
            (2200..=2800).contains(&total),
            "share 1 matched the secret in {total} byte positions"
        );
    }
}
