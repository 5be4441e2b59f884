//! The dealer: splits a secret and signs one fragment per holder.

use std::collections::BTreeSet;

use ed25519_dalek::SigningKey;

use crate::fragment::{DealId, FragmentError, FragmentHeader, VerifiedFragment};
use crate::holder::{HolderClass, HolderId, KeyId};
use crate::kcv::KeyCheckValue;
use crate::sharing::{self, SharingError, Threshold};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DealError {
    #[error("{count} holders given, at most 255 shares are possible")]
    TooManyHolders { count: usize },
    #[error("holder id {0} appears twice")]
    DuplicateHolder(HolderId),
    #[error(transparent)]
    Sharing(#[from] SharingError),
    #[error(transparent)]
    Fragment(#[from] FragmentError),
    #[error("no randomness from the operating system for the deal id")]
    Random,
}

pub type Result<T> = std::result::Result<T, DealError>;

/// One holder that is to receive a share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderSlot {
    pub class: HolderClass,
    pub id: HolderId,
}

impl HolderSlot {
    /// `count` holders of `class`, named `<class>-1` ... `<class>-<count>`.
    pub fn numbered(class: HolderClass, count: u8) -> impl Iterator<Item = HolderSlot> {
        (1..=count).map(move |i| HolderSlot {
            class,
            id: HolderId::numbered(class, i),
        })
    }
}

/// What to deal: the secret's name and epoch, the threshold k, and the holders (n = their count).
#[derive(Debug, Clone)]
pub struct DealPlan {
    pub key_id: KeyId,
    pub epoch: u64,
    pub k: u8,
    pub holders: Vec<HolderSlot>,
}

/// Splits `secret` k of n and signs fragment i for `plan.holders[i - 1]`, under a fresh random
/// deal id (one per call).
pub fn deal(secret: &[u8], plan: &DealPlan, dealer: &SigningKey) -> Result<Vec<VerifiedFragment>> {
    let id = DealId::random().map_err(|_| DealError::Random)?;
    deal_as(secret, plan, dealer, id)
}

/// [`deal`] under a given deal id: for fixed test vectors. A deal id must never be reused for
/// another split; [`deal`] draws a fresh one.
pub fn deal_as(
    secret: &[u8],
    plan: &DealPlan,
    dealer: &SigningKey,
    deal: DealId,
) -> Result<Vec<VerifiedFragment>> {
    let n = u8::try_from(plan.holders.len()).map_err(|_| DealError::TooManyHolders {
        count: plan.holders.len(),
    })?;
    let mut seen = BTreeSet::new();
    if let Some(dup) = plan.holders.iter().find(|h| !seen.insert(&h.id)) {
        return Err(DealError::DuplicateHolder(dup.id.clone()));
    }
    let threshold = Threshold::new(plan.k, n)?;
    let kcv = KeyCheckValue::compute(secret, &plan.key_id);
    let shares = sharing::split(secret, threshold)?;
    shares
        .iter()
        .zip(&plan.holders)
        .map(|(share, holder)| {
            let header = FragmentHeader {
                key_id: plan.key_id.clone(),
                epoch: plan.epoch,
                deal,
                index: share.index(),
                threshold,
                class: holder.class,
                holder_id: holder.id.clone(),
                kcv,
            };
            VerifiedFragment::sign(header, share, dealer).map_err(DealError::from)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;

    fn plan(k: u8, holders: Vec<HolderSlot>) -> DealPlan {
        DealPlan {
            key_id: KeyId::new("vol").unwrap(),
            epoch: 7,
            k,
            holders,
        }
    }

    #[test]
    fn one_signed_fragment_per_holder_in_order() {
        let key = keys::generate().unwrap();
        let holders: Vec<_> = HolderSlot::numbered(HolderClass::Vhd, 2)
            .chain(HolderSlot::numbered(HolderClass::Tpm, 1))
            .collect();
        let fragments = deal(b"0123456789abcdef", &plan(3, holders), &key).unwrap();
        let summary: Vec<_> = fragments
            .iter()
            .map(|f| {
                let h = f.header();
                (
                    h.index,
                    h.class,
                    h.holder_id.to_string(),
                    h.epoch,
                    h.threshold.k(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (1, HolderClass::Vhd, "vhd-1".into(), 7, 3),
                (2, HolderClass::Vhd, "vhd-2".into(), 7, 3),
                (3, HolderClass::Tpm, "tpm-1".into(), 7, 3),
            ]
        );
        for fragment in &fragments {
            let reparsed = crate::Fragment::parse(fragment.encoded()).unwrap();
            assert!(reparsed.verify(&key.verifying_key()).is_ok());
        }
    }

    #[test]
    fn one_deal_id_per_deal_and_a_new_one_each_time() {
        let key = keys::generate().unwrap();
        let holders: Vec<_> = HolderSlot::numbered(HolderClass::Vhd, 3).collect();
        let first = deal(b"secret", &plan(2, holders.clone()), &key).unwrap();
        let second = deal(b"secret", &plan(2, holders), &key).unwrap();
        let id = first[0].header().deal;
        assert!(first.iter().all(|f| f.header().deal == id));
        assert!(second.iter().all(|f| f.header().deal != id));
    }

    #[test]
    fn refuses_duplicate_holders_and_bad_thresholds() {
        let key = keys::generate().unwrap();
        let twice = vec![
            HolderSlot::numbered(HolderClass::Vhd, 1).next().unwrap(),
            HolderSlot::numbered(HolderClass::Vhd, 1).next().unwrap(),
        ];
        assert_eq!(
            deal(b"s", &plan(2, twice), &key).unwrap_err(),
            DealError::DuplicateHolder(HolderId::new("vhd-1").unwrap())
        );
        let two = HolderSlot::numbered(HolderClass::Vhd, 2).collect();
        assert_eq!(
            deal(b"s", &plan(3, two), &key).unwrap_err(),
            DealError::Sharing(SharingError::ThresholdAboveShares { k: 3, n: 2 })
        );
    }
}
