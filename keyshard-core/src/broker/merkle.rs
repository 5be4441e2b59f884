//! Merkle trees over `tpm` release nonces: one host quote answers many requests. The quote's
//! qualifying data is the root of a tree whose leaves are the pending requests' nonces; each
//! answer carries the quote and its request's inclusion path, and the guest recomputes the root
//! from its own nonce and that path.
//!
//! SHA-256, domain-separated: a leaf is `SHA-256(0x00 || nonce)`, a node
//! `SHA-256(0x01 || left || right)`, so no leaf can pass for a node. Leaves are paired left to
//! right, level by level; an odd last node is carried up unchanged (its path has no step for that
//! level). A tree of one nonce has the root `SHA-256(0x00 || nonce)` and an empty path.

use sha2::{Digest as _, Sha256};

use super::NONCE_LEN;

pub const HASH_LEN: usize = 32;
/// Deepest path an answer carries: 2^16 requests in one quote, far beyond any batch.
pub const MAX_PATH_LEN: usize = 16;

const LEAF_TAG: u8 = 0x00;
const NODE_TAG: u8 = 0x01;

pub type Hash = [u8; HASH_LEN];

/// One level of an inclusion path: the sibling's hash and on which side it sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathStep {
    /// True: the sibling is the left child (the path's node is the right one).
    pub sibling_on_left: bool,
    pub sibling: Hash,
}

pub fn leaf(nonce: &[u8; NONCE_LEN]) -> Hash {
    Sha256::new()
        .chain_update([LEAF_TAG])
        .chain_update(nonce)
        .finalize()
        .into()
}

fn node(left: &Hash, right: &Hash) -> Hash {
    Sha256::new()
        .chain_update([NODE_TAG])
        .chain_update(left)
        .chain_update(right)
        .finalize()
        .into()
}

/// The root that `nonce` and `path` lead to; the guest compares it with the quote's nonce.
pub fn root_from_path(nonce: &[u8; NONCE_LEN], path: &[PathStep]) -> Hash {
    path.iter().fold(leaf(nonce), |hash, step| {
        if step.sibling_on_left {
            node(&step.sibling, &hash)
        } else {
            node(&hash, &step.sibling)
        }
    })
}

/// A tree over a batch of nonces, every level kept, to hand out each leaf's path.
#[derive(Debug, Clone)]
pub struct Tree {
    /// `levels[0]` the leaves, the last level the root alone.
    levels: Vec<Vec<Hash>>,
}

impl Tree {
    /// None for an empty batch.
    pub fn new(nonces: &[[u8; NONCE_LEN]]) -> Option<Self> {
        let mut level: Vec<Hash> = nonces.iter().map(leaf).collect();
        if level.is_empty() {
            return None;
        }
        let mut levels = Vec::new();
        while level.len() > 1 {
            let next = level
                .chunks(2)
                .map(|pair| match pair {
                    [left, right] => node(left, right),
                    [alone] => *alone,
                    _ => [0; HASH_LEN],
                })
                .collect();
            levels.push(std::mem::replace(&mut level, next));
        }
        levels.push(level);
        Some(Self { levels })
    }

    pub fn root(&self) -> Hash {
        self.levels
            .last()
            .and_then(|top| top.first())
            .copied()
            .unwrap_or([0; HASH_LEN])
    }

    /// The inclusion path of leaf `index`; None if there is no such leaf.
    pub fn path(&self, mut index: usize) -> Option<Vec<PathStep>> {
        self.levels.first()?.get(index)?;
        let mut path = Vec::new();
        for level in self.levels.iter().take(self.levels.len().saturating_sub(1)) {
            let sibling_index = index ^ 1;
            if let Some(sibling) = level.get(sibling_index) {
                path.push(PathStep {
                    sibling_on_left: sibling_index < index,
                    sibling: *sibling,
                });
            }
            index /= 2;
        }
        Some(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nonces(n: usize) -> Vec<[u8; NONCE_LEN]> {
        (0..n)
            .map(|i| [u8::try_from(i).unwrap(); NONCE_LEN])
            .collect()
    }

    #[test]
    fn every_leaf_of_every_size_leads_to_the_root() {
        for n in 1..=17 {
            let batch = nonces(n);
            let tree = Tree::new(&batch).unwrap();
            for (i, nonce) in batch.iter().enumerate() {
                let path = tree.path(i).unwrap();
                assert!(path.len() <= MAX_PATH_LEN);
                assert_eq!(root_from_path(nonce, &path), tree.root(), "n={n} i={i}");
            }
            assert!(tree.path(n).is_none());
        }
        assert!(Tree::new(&[]).is_none());
    }

    #[test]
    fn a_nonce_not_in_the_batch_or_a_tampered_path_misses_the_root() {
        let batch = nonces(5);
        let tree = Tree::new(&batch).unwrap();
        let path = tree.path(2).unwrap();
        assert_ne!(root_from_path(&[0xee; NONCE_LEN], &path), tree.root());
        assert_ne!(root_from_path(&batch[3], &path), tree.root());
        let mut flipped = path.clone();
        flipped[0].sibling_on_left = !flipped[0].sibling_on_left;
        assert_ne!(root_from_path(&batch[2], &flipped), tree.root());
        // A single-leaf tree's root is the domain-separated leaf, not the nonce itself.
        let one = Tree::new(&batch[..1]).unwrap();
        assert_eq!(one.root(), leaf(&batch[0]));
        assert_ne!(one.root(), batch[0]);
    }
}
