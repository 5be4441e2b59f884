//! Trust anchors: the ARK and ASK a product's VCEKs must chain to. In production these are
//! AMD's, built into the `sev` crate ([`TrustAnchors::amd`]); tests pin their own. They are
//! configuration, never taken from a guest's or the host's certificate table.

use std::collections::BTreeMap;

use sev::certs::snp::{Certificate, builtin};

use super::product::Product;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnchorError {
    #[error("the built-in {product} {which} does not parse: {reason}")]
    Builtin {
        product: Product,
        which: &'static str,
        reason: String,
    },
    #[error("the {product} {which} is not a DER X.509 certificate: {reason}")]
    Der {
        product: Product,
        which: &'static str,
        reason: String,
    },
}

pub type Result<T> = std::result::Result<T, AnchorError>;

/// One product's root (ARK, self-signed) and intermediate (ASK, signed by the ARK).
#[derive(Debug, Clone)]
pub struct AnchorPair {
    pub ark: Certificate,
    pub ask: Certificate,
}

/// The pinned roots, by product.
#[derive(Debug, Clone, Default)]
pub struct TrustAnchors {
    pairs: BTreeMap<Product, AnchorPair>,
}

impl TrustAnchors {
    /// AMD's ARK and ASK for Milan, Genoa and Turin, as the `sev` crate ships them.
    pub fn amd() -> Result<Self> {
        let mut anchors = Self::default();
        for product in Product::ALL {
            let (ark, ask) = match product {
                Product::Milan => (builtin::milan::ark(), builtin::milan::ask()),
                Product::Genoa => (builtin::genoa::ark(), builtin::genoa::ask()),
                Product::Turin => (builtin::turin::ark(), builtin::turin::ask()),
            };
            let builtin_error = |which| {
                move |e: std::io::Error| AnchorError::Builtin {
                    product,
                    which,
                    reason: e.to_string(),
                }
            };
            let pair = AnchorPair {
                ark: ark.map_err(builtin_error("ARK"))?,
                ask: ask.map_err(builtin_error("ASK"))?,
            };
            anchors.pairs.insert(product, pair);
        }
        Ok(anchors)
    }

    /// No anchors at all: every VCEK is refused until [`Self::with`] adds some.
    pub fn none() -> Self {
        Self::default()
    }

    /// Pins `ark` and `ask` (DER) for `product`, replacing what was there. For tests and for an
    /// operator's own configuration; never for certificates that arrive with evidence.
    pub fn with(mut self, product: Product, ark_der: &[u8], ask_der: &[u8]) -> Result<Self> {
        let parse = |which, der: &[u8]| {
            Certificate::from_der(der).map_err(|e| AnchorError::Der {
                product,
                which,
                reason: e.to_string(),
            })
        };
        let pair = AnchorPair {
            ark: parse("ARK", ark_der)?,
            ask: parse("ASK", ask_der)?,
        };
        self.pairs.insert(product, pair);
        Ok(self)
    }

    pub fn get(&self, product: Product) -> Option<&AnchorPair> {
        self.pairs.get(&product)
    }

    pub fn products(&self) -> impl Iterator<Item = Product> + '_ {
        self.pairs.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amd_anchors_cover_every_product() {
        let anchors = TrustAnchors::amd().unwrap();
        assert_eq!(
            anchors.products().collect::<Vec<_>>(),
            Product::ALL.to_vec()
        );
        assert!(TrustAnchors::none().get(Product::Milan).is_none());
    }

    #[test]
    fn injected_anchors_must_be_der() {
        let milan = TrustAnchors::amd().unwrap();
        let pair = milan.get(Product::Milan).unwrap();
        let ark = pair.ark.to_der().unwrap();
        let ask = pair.ask.to_der().unwrap();
        let pinned = TrustAnchors::none()
            .with(Product::Genoa, &ark, &ask)
            .unwrap();
        assert!(pinned.get(Product::Genoa).is_some());
        assert!(pinned.get(Product::Milan).is_none());
        assert!(matches!(
            TrustAnchors::none().with(Product::Milan, b"junk", &ask),
            Err(AnchorError::Der { which: "ARK", .. })
        ));
    }
}
